"""INT8 symmetric quantization: per-output-channel weights, per-token activations (W8A8).

Scale (float32 multiplier, `x ~= q * scale`): amax over the channel/token, clamped to >= 1e-10
so all-zero rows stay finite; scale = amax / 127.
Quantize: q = clamp(round_half_even(x_fp32 / scale), -127, 127) as int8. The range is
symmetric (-128 is never produced) so negation is exact; ties round to even (`torch.round`,
`cvt.rni`), the same in the kernels.

On disk:
    compressed-tensors `int-quantized`: `<name>.weight` int8 [N, K], `<name>.weight_scale`
        float32 [N, 1] (strategy "channel"); activations dynamic per token.
    SGLang `w8a8_int8`: the same two tensors (scale must be [N, 1] float32 for its MLA path).
NaN/Inf input raises ValueError.
"""

from __future__ import annotations

import torch

from dsquant.formats._checks import check_finite, div_ieee

INT8_MAX = 127
INT8_AMAX_FLOOR = 1e-10


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    return div_ieee(amax.float().clamp(min=INT8_AMAX_FLOOR), INT8_MAX)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_int8_per_token(x: torch.Tensor, *, name: str = "tensor"):
    """x [..., K] -> (q int8 [..., K]; scale float32 [..., 1]). Also serves per-output-channel weights."""
    check_finite(x, name)
    scale = int8_scale(x.abs().amax(dim=-1, keepdim=True))
    return _cast(x, scale), scale


def quantize_int8_per_channel(w: torch.Tensor, *, name: str = "tensor"):
    """w [N, K] -> (q int8 [N, K]; scale float32 [N, 1]): one scale per output channel (row)."""
    assert w.dim() == 2, f"{name}: per-channel quantization needs a 2-D weight, got {tuple(w.shape)}"
    return quantize_int8_per_token(w, name=name)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)
