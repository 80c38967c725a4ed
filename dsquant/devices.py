"""`--device` as a list of devices, the same way for convert and eval: "cpu" is the host, "cuda" every visible
GPU, "cuda:N" one GPU. A clear ValueError for anything else, or for CUDA on a machine without it. And how many
CPU threads torch uses (`--threads`), one rule for every command."""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_devices(device: str) -> list[str]:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return ["cpu"]
    if dev.type != "cuda":
        raise ValueError(f"--device {device}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    n = torch.cuda.device_count()
    if dev.index is None:
        return [f"cuda:{i}" for i in range(n)]
    if dev.index >= n:
        raise ValueError(f"--device {device}: only {n} GPU(s) visible")
    return [f"cuda:{dev.index}"]


def current_device(device) -> contextlib.AbstractContextManager:
    """Make `device` the thread's current CUDA device (Triton launches there; a thread driving cuda:1 must
    say so); a no-op for the host."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` narrow), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity outside Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """CPU threads for torch when --threads is not given: the usable cores that are not already busy (the
    one-minute load average), at least one. OpenMP threads spin while they wait, so a thread per core on cores
    that other processes hold slows every small op down several times."""
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, usable_cores() - busy)


@contextlib.contextmanager
def cpu_threads(n: int | None = None):
    """Run the block with `n` torch CPU threads (None: default_threads()), restoring the previous count."""
    if n is not None and n < 1:
        raise ValueError(f"--threads {n}: must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(n or default_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
