"""Input checks and exact arithmetic shared by the format quantizers."""

from __future__ import annotations

import torch


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError naming the tensor if it holds NaN or Inf (quantizing those gives garbage scales)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name}: holds {n_nan} NaN and {n_inf} Inf values; refusing to quantize it")


def check_divisible(size: int, block: int, what: str, name: str) -> None:
    if size % block != 0:
        raise ValueError(f"{name}: {what} {size} is not a multiple of {block}, which this format needs")


def div_ieee(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor with one IEEE rounding on every device.

    torch on CUDA turns a division by a Python scalar into a multiply by its rounded reciprocal,
    which differs from the true quotient in the last bit for some inputs; dividing by a tensor on
    t's device keeps the correctly rounded quotient that the spec (and the kernels) use.
    """
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)
