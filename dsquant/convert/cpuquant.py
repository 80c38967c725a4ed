"""CPU weight quantizers for `convert`, bit-identical to dsquant.formats but with fewer, cheaper passes.

Same signatures and outputs as the format references (quantize_fp8_block, quantize_int8_per_token,
quantize_nvfp4, quantize_mxfp4); tests/checkpoint/test_cpuquant.py checks every code and scale against them.
What differs is only how the same numbers are computed on a CPU:

- BF16 input stays BF16 until the division: |x| and block maxima are exact in BF16, and dividing a BF16
  tensor by float32 scales computes in float32 (type promotion widens each element exactly), so no
  float32 copy of the input is made.
- NaN/Inf is detected on the block amaxes (max propagates NaN; Inf stays Inf), not with a full-size
  isfinite pass; the offending tensor is then reported by the reference check, with its counts.
- FP8 128x128 block maxima are taken as 1x128 maxima along K, then the max over 128 rows: two cheap
  reductions instead of one over two strided dims.
- E2M1 rounding uses float arithmetic instead of seven comparisons: with E the float32 exponent of v = |y|,
  the grid step is s = 2^(clamp(E, 0, 2) - 1) (0.5 below 2, 1 below 4, 2 above), and
  code = min(round_half_even(v / s) + 2 * clamp(E, 0, 2), 7). v / s is exact (a power of two), and
  round-half-even reproduces the format's ties (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
  3.5 -> 4, 5 -> 4) because each tie is a half-integer multiple of its region's step.
- The zero-denominator guard (torch.where) runs only when a block scale underflowed to zero.
- Temporaries are updated in place where the reference allocates a new tensor per step.
- When the C extension was built at install (native.py), block amaxes, the FP8 cast, per-row INT8 and the
  division + E2M1 rounding + packing each run as one C loop instead; the torch code above is the fallback.
"""

from __future__ import annotations

import torch

from dsquant.convert import native
from dsquant.formats import fp8, mxfp4, nvfp4
from dsquant.formats._checks import check_finite
from dsquant.formats.fp4 import pack_fp4
from dsquant.formats.fp8 import FP8_BLOCK, FP8_DTYPE, FP8_E4M3_MAX, fp8_scale
from dsquant.formats.int8 import INT8_MAX, int8_scale
from dsquant.formats.mxfp4 import E8M0_BIAS, MXFP4_BLOCK, e8m0_to_float, mxfp4_scale_exponent
from dsquant.formats.nvfp4 import NVFP4_BLOCK, nvfp4_block_scale, nvfp4_global_scale


def _finite(amax: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        check_finite(x, name)  # raises with the NaN/Inf counts


def _block_amax(x: torch.Tensor, block: int, name: str) -> torch.Tensor:
    """x [..., K] -> float32 max |x| over consecutive blocks of `block` -> [..., K // block]; NaN/Inf raise."""
    if native.accepts(x):
        amax, bad = native.block_amax(x, block)
        if bad:
            check_finite(x, name)
        return amax
    amax = x.abs().reshape(*x.shape[:-1], x.shape[-1] // block, block).amax(dim=-1).float()
    _finite(amax, x, name)
    return amax


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """float32 values already divided by their scale -> uint8 E2M1 codes, equal to formats.fp4.round_to_e2m1."""
    sign = (y < 0).to(torch.uint8) << 3  # sign as the reference takes it: from the scaled value
    v = y.abs()
    exp = (v.view(torch.int32) >> 23).sub_(127).clamp_(0, 2)  # 0: v < 2, 1: v < 4, 2: v >= 4
    step = exp.add(126).bitwise_left_shift_(23).view(torch.float32)  # 2^(exp - 1)
    mag = v.div_(step).round_().add_(exp.mul_(2)).clamp_(max=7).to(torch.uint8)
    return mag.bitwise_or_(sign)


def quantize_fp8_block(w: torch.Tensor, block_size: int = FP8_BLOCK, *, ue8m0: bool = False, name: str = "tensor"):
    """w [N, K] -> (q float8_e4m3fn [N, K]; scale float32 [ceil(N/128), ceil(K/128)]), as formats.fp8."""
    n, k = w.shape
    if n % block_size or k % block_size:  # ragged edge blocks: the reference pads
        return fp8.quantize_fp8_block(w, block_size, ue8m0=ue8m0, name=name)
    nb, kb = n // block_size, k // block_size
    scale = fp8_scale(_block_amax(w, block_size, name).reshape(nb, block_size, kb).amax(dim=1), ue8m0)
    if native.accepts(w):
        return native.fp8_block_cast(w, scale, block_size), scale
    q = w.reshape(nb, block_size, kb, block_size) / scale[:, None, :, None]  # float32 [NB, b, KB, b]
    return q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE).reshape(n, k), scale


def quantize_int8_per_token(x: torch.Tensor, *, name: str = "tensor"):
    """x [..., K] -> (q int8 [..., K]; scale float32 [..., 1]), as formats.int8."""
    if native.accepts(x) and x.dim() == 2:
        out = native.int8_rows(x)
        if out is None:
            check_finite(x, name)  # raises with the NaN/Inf counts
        return out
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    _finite(amax, x, name)
    scale = int8_scale(amax)
    return (x / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def _e2m1_packed(x: torch.Tensor, bamax: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """x [..., K] / denom [..., K // block] (one per block; 0 where denom is 0) -> packed E2M1 uint8 [..., K // 2]."""
    if native.accepts(x):
        return native.e2m1_pack(x, denom, x.shape[-1] // bamax.shape[-1])
    y = x.reshape(bamax.shape + (-1,)) / denom.unsqueeze(-1)  # float32 [..., K // block, block]
    if not bool((denom > 0).all()):
        y = torch.where(denom.unsqueeze(-1) > 0, y, torch.zeros_like(y))
    return pack_fp4(e2m1_codes(y.reshape(x.shape)))


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None, *, name: str = "tensor"):
    """x [..., K] -> (packed uint8 [..., K/2]; block_scale e4m3 [..., K/16]; global_scale float32 []), as formats."""
    if x.shape[-1] % NVFP4_BLOCK:
        return nvfp4.quantize_nvfp4(x, global_scale, name=name)
    bamax = _block_amax(x, NVFP4_BLOCK, name)
    if global_scale is None:
        global_scale = nvfp4_global_scale(bamax.amax())
    global_scale = global_scale.float().reshape(())
    block_scale = nvfp4_block_scale(bamax, global_scale)
    return _e2m1_packed(x, bamax, block_scale.float() * global_scale), block_scale, global_scale


def quantize_mxfp4(x: torch.Tensor, *, scale_rule: str = "ocp", name: str = "tensor"):
    """x [..., K] -> (packed uint8 [..., K/2]; scale E8M0 uint8 [..., K/32]), as formats.mxfp4."""
    if x.shape[-1] % MXFP4_BLOCK:
        return mxfp4.quantize_mxfp4(x, scale_rule=scale_rule, name=name)
    bamax = _block_amax(x, MXFP4_BLOCK, name)
    scale = (mxfp4_scale_exponent(bamax, scale_rule) + E8M0_BIAS).to(torch.uint8)
    return _e2m1_packed(x, bamax, e8m0_to_float(scale)), scale
