"""NVFP4: E2M1 elements, an E4M3 scale per 16 elements along K, and a float32 global scale.

Elements: E2M1 codes (see fp4.py for rounding, saturation, sign and nibble order), packed two
per byte along K: an [N, K] weight is uint8 [N, K // 2]. K % 16 == 0 is required.

Scales (both are dequantization multipliers, `x ~= e2m1 * block_scale * global_scale`):
    global_scale = amax(|x|) / (448 * 6)  over the whole tensor (1.0 for an all-zero tensor), or
                   given (activations: from calibration; fused partners: one shared value).
    block_scale  = E4M3(min((amax_16 / 6) / global_scale, 448)), round-to-nearest-even.
Quantize, in this arithmetic order (the kernels use the same, so codes agree bit for bit;
formats.md section 9 shows why the order matters for exact ties):
    denom = float32(block_scale) * global_scale
    code  = E2M1(x_fp32 / denom), or 0 where denom == 0 (a block whose scale underflows to 0).
Dequantize: e2m1_value * (float32(block_scale) * global_scale).

On disk (scale *names* and *directions* differ; formats.md sections 3-4):
    ModelOpt (`quant_algo: NVFP4`, hf_quant_config.json):
        weight uint8 [N, K/2]; weight_scale float8_e4m3fn [N, K/16];
        weight_scale_2 float32 [] = global_scale; input_scale float32 [] (activation global scale)
    compressed-tensors (`nvfp4-pack-quantized`):
        weight_packed uint8 [N, K/2]; weight_scale float8_e4m3fn [N, K/16];
        weight_global_scale float32 [1] = 1 / global_scale (a divisor);
        input_global_scale float32 [1] = 1 / activation global scale
Block scales are stored linear (row-major), never swizzled: engines swizzle at load.
NaN/Inf input raises ValueError.
"""

from __future__ import annotations

import torch

from dsquant.formats._checks import check_divisible, check_finite, div_ieee
from dsquant.formats.fp4 import FP4_E2M1_MAX, e2m1_to_float, pack_fp4, round_to_e2m1, unpack_fp4
from dsquant.formats.fp8 import FP8_DTYPE, FP8_E4M3_MAX

NVFP4_BLOCK = 16
NVFP4_GLOBAL_DIVISOR = FP8_E4M3_MAX * FP4_E2M1_MAX  # 2688


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """Tensor amax -> float32 global scale amax / 2688 (1.0 when amax is 0)."""
    amax = amax.float()
    return torch.where(amax > 0, div_ieee(amax, NVFP4_GLOBAL_DIVISOR), torch.ones_like(amax))


def nvfp4_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-16 amax (float32) -> float8_e4m3fn block scales."""
    return (div_ieee(block_amax, FP4_E2M1_MAX) / global_scale).clamp(max=FP8_E4M3_MAX).to(FP8_DTYPE)


def _global(global_scale: torch.Tensor) -> torch.Tensor:
    """A global scale as float32 []: or, given one per row ([..., 1], several), that, for rows of differing scales."""
    g = global_scale.float()
    return g.reshape(()) if g.numel() == 1 else g


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None, *, name: str = "tensor"):
    """x [M, K] -> (packed uint8 [M, K/2]; block_scale float8_e4m3fn [M, K/16]; global_scale float32 []).

    Leading dims beyond the last are allowed and kept: [..., K] -> [..., K/2], [..., K/16]. A given global_scale
    may also hold one value per row, [..., 1] (rows of several tensors at once, as a grouped GEMM's activations).
    """
    check_finite(x, name)
    k = x.shape[-1]
    check_divisible(k, NVFP4_BLOCK, "last dim", name)
    xf = x.float()
    if global_scale is None:
        global_scale = nvfp4_global_scale(xf.abs().amax())
    global_scale = _global(global_scale)
    xb = xf.reshape(*x.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)  # [..., K/16, 16]
    block_scale = nvfp4_block_scale(xb.abs().amax(dim=-1), global_scale)  # [..., K/16] e4m3
    denom = (block_scale.float() * global_scale).unsqueeze(-1)
    scaled = torch.where(denom > 0, xb / denom, torch.zeros_like(xb))
    codes = round_to_e2m1(scaled).reshape(x.shape)
    return pack_fp4(codes), block_scale, global_scale


def dequantize_nvfp4(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """(packed [..., K/2], block_scale [..., K/16], global_scale [] or per row [..., 1]) -> dtype [..., K]."""
    values = e2m1_to_float(unpack_fp4(packed))  # [..., K] float32
    k = values.shape[-1]
    vb = values.reshape(*values.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    scale = (block_scale.float() * _global(global_scale)).unsqueeze(-1)
    return (vb * scale).reshape(values.shape).to(dtype)
