"""RMSNorm and fused residual-add + RMSNorm in plain torch: the spec the Triton kernels match.

Arithmetic (both functions), per row of the last dim D:
    r   = x                                   (rms_norm)
    r   = (x_f32 + residual_f32) cast to x.dtype     (fused: the new residual, returned)
    y   = r_f32 * rsqrt(mean(r_f32^2) + eps) * weight_f32, cast to x.dtype
The residual is rounded to the activation dtype before it is normalized, as vLLM's
`fused_add_rms_norm` and DeepSeek-V3's block do (`x = x + attn(norm(x))` in bf16), so the
next layer sees the same residual whichever path produced it.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., D] (fp32/bf16/fp16), weight [D] -> y [..., D] in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D] -> (rms_norm(x + residual) [..., D], x + residual [..., D]), both in x.dtype."""
    r = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(r, weight, eps), r
