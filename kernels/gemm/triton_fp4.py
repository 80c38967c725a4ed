"""FP4-weight GEMMs on Hopper-class GPUs: NVFP4 and MXFP4 weights times bf16 activations.

Hopper has no FP4 tensor cores, so the weights are decoded in registers:
- W4A16 (every M, triton.py kernels): E2M1 codes times the block scale become bf16 exactly, then a
  bf16 MMA. At M <= 64 the swap-AB split-K kernel streams the packed bytes.
"""

from __future__ import annotations

import torch

from dsquant.kernels.gemm import configs
from dsquant.kernels.gemm.triton import _launch, _row_major


def _check_fp4_operands(x: torch.Tensor, w_packed: torch.Tensor) -> tuple[int, int, int]:
    assert x.dtype == torch.bfloat16 and x.dim() == 2, f"x must be bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}"
    assert w_packed.dtype == torch.uint8 and w_packed.dim() == 2, f"w_packed must be uint8 [N, K/2], got {w_packed.dtype}"
    (m, k), n = x.shape, w_packed.shape[0]
    assert w_packed.shape[1] * 2 == k, f"w_packed {tuple(w_packed.shape)} does not hold K={k} codes per row"
    assert k % 32 == 0, f"K={k} must be a multiple of 32 (16-byte TMA rows of packed FP4)"
    return m, n, k


def nvfp4_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_block_scale: torch.Tensor, w_global_scale: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ dequantize_nvfp4(w)^T.

    Args:
        x: bfloat16 [M, K], K % 32 == 0.
        w_packed: uint8 [N, K // 2] (E2M1 pairs, low nibble first).
        w_block_scale: float8_e4m3fn [N, K // 16]; w_global_scale: float32, one element.
        out: optional preallocated [M, N] output.
    Returns:
        out_dtype [M, N].
    """
    m, n, k = _check_fp4_operands(x, w_packed)
    assert w_block_scale.dtype == torch.float8_e4m3fn and tuple(w_block_scale.shape) == (n, k // 16), \
        f"w_block_scale {w_block_scale.dtype} {tuple(w_block_scale.shape)}, expected float8_e4m3fn {(n, k // 16)}"
    assert w_global_scale.numel() == 1 and w_global_scale.dtype == torch.float32, \
        f"w_global_scale must be one float32, got {w_global_scale.dtype} {tuple(w_global_scale.shape)}"
    return _launch(_row_major(x), _row_major(w_packed), out_dtype, configs.NVFP4,
                   w_scale=w_block_scale, global_scale=w_global_scale.reshape(1), out=out)


def mxfp4_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale_e8m0: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ dequantize_mxfp4(w)^T.

    Args:
        x: bfloat16 [M, K], K % 32 == 0.
        w_packed: uint8 [N, K // 2]; w_scale_e8m0: uint8 [N, K // 32] (biased exponents).
        out: optional preallocated [M, N] output.
    Returns:
        out_dtype [M, N].
    """
    m, n, k = _check_fp4_operands(x, w_packed)
    assert w_scale_e8m0.dtype == torch.uint8 and tuple(w_scale_e8m0.shape) == (n, k // 32), \
        f"w_scale_e8m0 {w_scale_e8m0.dtype} {tuple(w_scale_e8m0.shape)}, expected uint8 {(n, k // 32)}"
    return _launch(_row_major(x), _row_major(w_packed), out_dtype, configs.MXFP4, w_scale=w_scale_e8m0, out=out)
