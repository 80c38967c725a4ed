"""`--device` as a list of devices, the same way for convert and eval: "cpu" is the host, "cuda" every visible
GPU, "cuda:N" one GPU. A clear ValueError for anything else, or for CUDA on a machine without it."""

from __future__ import annotations

import contextlib

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
