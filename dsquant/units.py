"""Human-readable sizes and durations for every summary, table and progress line: decimal units (1 GB = 1e9
bytes), as Hugging Face writes shard sizes and as GB/s is quoted, and nowhere binary ones."""

from __future__ import annotations

BYTE_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: int | float | None) -> str:
    """1234567 -> '1.23 MB' (decimal units); None -> '?'."""
    if n is None:
        return "?"
    for unit in BYTE_UNITS:
        if abs(n) < 1000 or unit == BYTE_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    """75.2 -> '1:15', 3725 -> '1:02:05', 4.2 -> '4 s'."""
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
