"""QuantizedWeight: one weight as convert writes it, check and inspect read it, and the runner and kernels run it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dsquant.formats.registry import ACTS, Format, get


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight in dsquant's scale directions (every scale multiplies to dequantize).

    fmt: a dsquant.formats.registry name: "bf16" | "fp8-block" | "fp8-channel" | "int8" | "nvfp4" | "mxfp4".
    q: the codes as stored: bf16 [N, K] | float8_e4m3fn [N, K] | int8 [N, K] | uint8 packed [N, K/2].
    scale: None (bf16) | float32 [ceil(N/128), ceil(K/128)] | float32 [N, 1] (fp8-channel, int8) |
        float8_e4m3fn [N, K/16] | uint8 E8M0 [N, K/32].
    global_scale: float32 [] (nvfp4 weight global scale), else None.
    input_scale: float32 [] (nvfp4 static activation global scale, or fp8-channel static per-tensor activation
        scale), else None.
    act: the activation scheme a runner executes it with (registry.ACTS); the format's default when not given.
    """

    fmt: str
    q: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    act: str | None = None

    def __post_init__(self):
        fmt = get(self.fmt)
        object.__setattr__(self, "act", self.act or fmt.act)
        if self.act not in ACTS:
            raise ValueError(f"unknown activation scheme {self.act!r}; expected one of {ACTS}")

    @property
    def format(self) -> Format:
        return get(self.fmt)

    @property
    def shape(self) -> tuple[int, int]:
        """Logical [N, K] of the weight (packed FP4 stores K/2 bytes per row)."""
        return self.format.logical_shape(tuple(self.q.shape))

    @property
    def nbytes(self) -> int:
        ts = (self.q, self.scale, self.global_scale, self.input_scale)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def apply(self, fn) -> QuantizedWeight:
        """A copy with fn applied to each of its tensors (moving them to a device, say)."""
        tensors = {
            attr: fn(t)
            for attr in ("q", "scale", "global_scale", "input_scale")
            if (t := getattr(self, attr)) is not None
        }
        return replace(self, **tensors)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Dense [N, K] in dtype, with the format's own dequantization (dsquant.formats)."""
        return self.format.dequantize(self.q, self.scale, self.global_scale, dtype)
