"""Re-expressing a stored FP4 weight in another format without changing its values where the target can.

DeepSeek-V4 ships its routed experts as MXFP4 (E2M1 codes, one E8M0 scale 2^k per 32 along K). Two targets
hold most such blocks exactly, so conversion copies values instead of re-rounding them:

NVFP4 (ModelOpt's closed form, `cast_mxfp4_to_nvfp4.py`): global scale 2^m with m = k_max - 8, k_max the
    largest block exponent over the tensor (or over fused partners, which share m: w1 and w3). Each 32-block
    becomes two 16-blocks with E4M3 scale 2^(k - m) and the same nibbles. E4M3 holds 2^d exactly for
    -9 <= d <= 8 (2^-9..2^-7 as subnormals), and d <= 8 by the choice of m, so a block is carried verbatim
    when k >= m - 9. A block below that range is re-quantized from its exact values with NVFP4's own rule
    (formats.nvfp4) under the same global scale: all-zero blocks (E8M0 byte 0) stay exact that way.
FP8 128x128 blocks: the exact values are quantized with a power-of-two block scale (the smallest 2^t with
    amax / 2^t <= 448, formats.fp8's UE8M0 rule). E2M1 values have two significant bits, E4M3 three, so a
    value is exact unless it falls below E4M3's subnormal step 2^-9 * 2^t: a 128x128 block stays exact while
    its 32-blocks' exponents lie within about 14 binades of its largest.

Both report how many 32-element source blocks came out exact, and the largest absolute error of the rest,
so a conversion can say what it changed. The E8M0 input is the byte (uint8, or a float8_e8m0fnu view of it);
byte 255 (NaN) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsquant.formats.fp8 import dequantize_fp8_block, quantize_fp8_block
from dsquant.formats.mxfp4 import E8M0_BIAS, E8M0_NAN, MXFP4_BLOCK, dequantize_mxfp4, e8m0_bytes
from dsquant.formats.nvfp4 import NVFP4_BLOCK, dequantize_nvfp4, quantize_nvfp4

E4M3_POW2_MIN, E4M3_POW2_MAX = -9, 8  # exponents d whose 2^d E4M3 holds exactly
NVFP4_HEADROOM = 8  # m = k_max - 8 puts the largest block scale at 2^8


@dataclass(frozen=True)
class Exactness:
    """How many 32-element source blocks kept their values, and the largest change elsewhere."""

    exact_blocks: int
    total_blocks: int
    max_abs_error: float

    def __add__(self, other: "Exactness") -> "Exactness":
        return Exactness(self.exact_blocks + other.exact_blocks, self.total_blocks + other.total_blocks,
                         max(self.max_abs_error, other.max_abs_error))


def _source_e8m0(scale: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """A source's E8M0 scales as uint8 bytes; refuses the NaN byte 255."""
    scale = e8m0_bytes(scale, name)
    if bool((scale == E8M0_NAN).any()):
        raise ValueError(f"{name}: E8M0 scale byte 255 (NaN) in the source")
    return scale


def _exactness(before: torch.Tensor, after: torch.Tensor) -> Exactness:
    """Compare float32 values [..., K] per 32-element block."""
    k = before.shape[-1]
    same = (before == after).reshape(-1, k // MXFP4_BLOCK, MXFP4_BLOCK).all(dim=-1)
    err = (before - after).abs().max().item() if before.numel() else 0.0
    return Exactness(int(same.sum()), same.numel(), float(err))


def nvfp4_shared_exponent(*scales: torch.Tensor) -> int:
    """m = k_max - 8 over every given MXFP4 scale tensor (fused partners pass all of theirs)."""
    k_max = max(int(_source_e8m0(s).max()) for s in scales) - E8M0_BIAS
    return k_max - NVFP4_HEADROOM


def mxfp4_to_nvfp4(packed: torch.Tensor, scale: torch.Tensor, exponent: int | None = None, *, name: str = "tensor"):
    """MXFP4 (packed [N, K/2], E8M0 [N, K/32]) -> (packed uint8, E4M3 block_scale [N, K/16], global_scale [],
    Exactness).

    exponent: m of the global scale 2^m; default nvfp4_shared_exponent(scale). Nibbles of in-range blocks are
    copied, so equal values come with equal bytes.
    """
    sb = _source_e8m0(scale, name)
    packed = packed.view(torch.uint8)
    m = nvfp4_shared_exponent(sb) if exponent is None else exponent
    global_scale = torch.ldexp(torch.tensor(1.0), torch.tensor(m)).float()
    d = sb.int() - E8M0_BIAS - m  # [N, K/32]
    in_range = (d >= E4M3_POW2_MIN) & (d <= E4M3_POW2_MAX)
    pow2 = torch.ldexp(torch.ones(d.shape), d.clamp(E4M3_POW2_MIN, E4M3_POW2_MAX)).to(torch.float8_e4m3fn)
    per16 = MXFP4_BLOCK // NVFP4_BLOCK
    block_scale = pow2.repeat_interleave(per16, dim=-1)
    out = packed.clone()
    values = dequantize_mxfp4(packed, sb, torch.float32)
    if not bool(in_range.all()):  # re-quantize the blocks the closed form cannot hold
        rq_packed, rq_scale, _ = quantize_nvfp4(values, global_scale, name=name)
        redo16 = (~in_range).repeat_interleave(per16, dim=-1)
        block_scale = torch.where(redo16, rq_scale.view(torch.uint8), block_scale.view(torch.uint8))
        block_scale = block_scale.view(torch.float8_e4m3fn)
        bytes_per_block = MXFP4_BLOCK // 2
        redo_bytes = (~in_range).repeat_interleave(bytes_per_block, dim=-1)
        out = torch.where(redo_bytes, rq_packed, out)
    after = dequantize_nvfp4(out, block_scale, global_scale, torch.float32)
    return out, block_scale, global_scale, _exactness(values, after)


def mxfp4_to_fp8_block(packed: torch.Tensor, scale: torch.Tensor, *, name: str = "tensor"):
    """MXFP4 (packed [N, K/2], E8M0 [N, K/32]) -> (float8_e4m3fn [N, K], float32 [N/128, K/128] power-of-two
    block scales, Exactness)."""
    values = dequantize_mxfp4(packed.view(torch.uint8), _source_e8m0(scale, name), torch.float32)
    q, block_scale = quantize_fp8_block(values, ue8m0=True, name=name)
    after = dequantize_fp8_block(q, block_scale, dtype=torch.float32)
    return q, block_scale, _exactness(values, after)
