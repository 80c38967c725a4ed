"""Pure-torch scaled-mm GEMMs, the spec the Triton kernels in triton.py are measured against.

Each reference dequantizes its operands with dsquant.formats (exactly, in float32) and multiplies
in float64, so its only rounding is the final cast to `out_dtype`. The kernels accumulate in
float32 (FP8/FP4) or int32 (INT8); tests compare the two with a global error metric.

Every function computes out[M, N] = x[M, K] @ W[N, K]^T, with W in a dsquant on-disk layout.
"""

from __future__ import annotations

import torch

from dsquant.formats import dequantize_fp8_block, dequantize_fp8_per_token_group, dequantize_mxfp4, dequantize_nvfp4


def _matmul_nt(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return (x.double() @ w.double().T).to(out_dtype)  # [M, N]


def fp8_block_gemm_ref(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """DeepSeek FP8 block GEMM.

    Args:
        a: float8_e4m3fn [M, K], K % 128 == 0 (activations, 1x128 groups).
        a_scale: float32 [M, K // 128], any strides (row-major or the column-major view).
        b: float8_e4m3fn [N, K] (weight).
        b_scale: float32 [ceil(N / 128), K // 128] (DeepSeek `weight_scale_inv`, multiplies).
    Returns:
        out_dtype [M, N].
    """
    x = dequantize_fp8_per_token_group(a, a_scale, dtype=torch.float32)  # [M, K]
    w = dequantize_fp8_block(b, b_scale, dtype=torch.float32)  # [N, K]
    return _matmul_nt(x, w, out_dtype)


def int8_scaled_mm_ref(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 INT8 GEMM: out = (a @ b^T) * a_scale * b_scale^T + bias.

    Args:
        a: int8 [M, K]; a_scale: float32 [M, 1] (per token).
        b: int8 [N, K]; b_scale: float32 [N, 1] (per output channel).
        bias: optional [N] (any float dtype).
    Returns:
        out_dtype [M, N].
    """
    acc = a.double() @ b.double().T  # [M, N], exact: |sum| < 2^53
    out = acc * a_scale.double().reshape(-1, 1) * b_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double().reshape(1, -1)
    return out.to(out_dtype)


def nvfp4_gemm_ref(
    x: torch.Tensor, w_packed: torch.Tensor, w_block_scale: torch.Tensor, w_global_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """bf16 activations x NVFP4 weights.

    Args:
        x: bfloat16 [M, K].
        w_packed: uint8 [N, K // 2]; w_block_scale: float8_e4m3fn [N, K // 16]; w_global_scale: float32 [].
    Returns:
        out_dtype [M, N].
    """
    w = dequantize_nvfp4(w_packed, w_block_scale, w_global_scale, dtype=torch.float32)  # [N, K]
    return _matmul_nt(x, w, out_dtype)


def mxfp4_gemm_ref(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale_e8m0: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """bf16 activations x MXFP4 weights.

    Args:
        x: bfloat16 [M, K].
        w_packed: uint8 [N, K // 2]; w_scale_e8m0: uint8 [N, K // 32] (biased exponents).
    Returns:
        out_dtype [M, N].
    """
    w = dequantize_mxfp4(w_packed, w_scale_e8m0, dtype=torch.float32)  # [N, K]
    return _matmul_nt(x, w, out_dtype)


def w4a16_gemm_ref(x: torch.Tensor, weight, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """bf16 activations x an NVFP4 / MXFP4 weight in the MMA layout (fp4_mma_layout.Fp4MmaWeight): the weight
    is put back in dsquant's layout, then nvfp4_gemm_ref / mxfp4_gemm_ref."""
    from dsquant.kernels.gemm.fp4_mma_layout import from_mma_layout

    w_packed, w_scale = from_mma_layout(weight)
    if weight.nvfp4:
        return nvfp4_gemm_ref(x, w_packed, w_scale, weight.global_scale, out_dtype)
    return mxfp4_gemm_ref(x, w_packed, w_scale, out_dtype)
