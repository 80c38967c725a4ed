"""Progress of long work (eval, demo, calibration, generate) on stderr, with its rate and time left.

On a terminal this is a tqdm bar redrawn in place. Anywhere else (a log file, CI, a pipe) it is one plain line
per step, without carriage returns, so the record reads line by line; `every` thins those lines out for work
with many short steps (the last step is always printed)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from dsquant.units import human_seconds


class Progress:
    """update(n) after each step of `total` units; close() (or leaving the `with` block) ends the display."""

    def __init__(self, desc: str, total: float, unit: str = "tokens", *, enabled: bool = True, every: float = 0.0,
                 stream=None):  # fmt: skip
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0.0
        self.t0 = self.last_line = time.perf_counter()
        self.pending = False
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=self.stream, smoothing=0.1,
                            dynamic_ncols=True)  # fmt: skip

    def update(self, n: float = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        self.pending = True
        if now - self.last_line >= self.every or self.done >= self.total:
            self._line(now)

    def line(self) -> str:
        """The current state as one line: '<desc>: 4096/8192 tokens (50%), 812 tokens/s, 5 s left'."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "done" if self.done >= self.total else "? left" if left == float("inf") else f"{human_seconds(left)} left"
        return (f"{self.desc}: {self.done:,.0f}/{self.total:,.0f} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:,.0f} {self.unit}/s, {eta}")

    def _line(self, now: float) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.last_line, self.pending = now, False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.pending:
            self._line(time.perf_counter())
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
