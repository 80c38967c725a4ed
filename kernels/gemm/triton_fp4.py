"""FP4-weight GEMMs on Hopper-class GPUs: NVFP4 and MXFP4 weights times bf16 activations.

Hopper has no FP4 tensor cores, so the weights are decoded in registers (kernels in triton.py):
- W4A16 (NVFP4 at every M, MXFP4 below W4A8_MIN_M): E2M1 codes times the block scale are exact in
  bf16, then a bf16 MMA. At M <= 64 the swap-AB split-K kernel streams the packed bytes.
- W4A8 (MXFP4 from configs.W4A8_MIN_M rows on): activations are quantized per 1x128 group to FP8
  (dsquant.kernels.quant), the E2M1 codes are expanded to E4M3 with each 32-block's exponent taken
  relative to the largest in its 128-K group, and the FP8 MMA is promoted into fp32 every 128 K with
  a_s * 2^e_max, as in fp8_block_gemm. Its result differs from the bf16-activation reference by the
  activation's FP8 rounding (calc_diff ~4e-4, the FP8 class), and an Inf activation turns its row to
  NaN (its group scale becomes Inf).
- NVFP4 has no W4A8 path: its E4M3 block scale times an E2M1 value needs 6 significant bits, more
  than E4M3 holds, so the scale would have to be applied per 16-K sub-block, below the K = 32 of an
  FP8 MMA instruction; it is dequantized to bf16 instead.
- Native FP4: on compute capability >= 10, MXFP4 at M > 64 goes to `tl.dot_scaled` (packed codes
  and E8M0 scales straight into FP4 tensor cores) instead of W4A16/W4A8. On Hopper Triton emulates
  it, which test_gemm_kernels.py forces to check the operand layout.
"""

from __future__ import annotations

import torch
from dsquant.kernels import format_codes
from dsquant.kernels.gemm import configs
from dsquant.kernels.gemm.triton import launch_gemm, row_major


def _check_fp4_operands(x: torch.Tensor, w_packed: torch.Tensor) -> tuple[int, int, int]:
    assert x.dtype == torch.bfloat16 and x.dim() == 2, f"x must be bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}"
    assert w_packed.dtype == torch.uint8 and w_packed.dim() == 2, \
        f"w_packed must be uint8 [N, K/2], got {w_packed.dtype}"
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
    return launch_gemm(row_major(x), row_major(w_packed), out_dtype, format_codes.NVFP4,
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
    native_fp4 = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 10
    if m >= configs.W4A8_MIN_M and k % 128 == 0 and x.is_cuda and not native_fp4:
        return mxfp4_gemm_w4a8(x, w_packed, w_scale_e8m0, out_dtype, out)
    return launch_gemm(row_major(x), row_major(w_packed), out_dtype, format_codes.MXFP4, w_scale=w_scale_e8m0, out=out)


def mxfp4_gemm_w4a8(x: torch.Tensor, w_packed: torch.Tensor, w_scale_e8m0: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """mxfp4_gemm through FP8 tensor cores at any M (mxfp4_gemm picks it from configs.W4A8_MIN_M rows).

    Same arguments as mxfp4_gemm; K % 128 == 0. The activations are quantized per 1x128 group first.
    """
    from dsquant.kernels.quant import quantize_fp8_per_token_group

    m, n, k = _check_fp4_operands(x, w_packed)
    assert k % 128 == 0, f"K={k} must be a multiple of 128 for the FP8 activation groups"
    a, a_scale = quantize_fp8_per_token_group(x, 128, column_major_scales=True)
    return mxfp4_gemm_w4a8_quantized(a, a_scale, w_packed, w_scale_e8m0, out_dtype, out)


def mxfp4_gemm_w4a8_quantized(a: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor,
                              w_scale_e8m0: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8 MXFP4 GEMM on activations already in FP8: a float8_e4m3fn [M, K], a_scale float32 [M, K // 128]."""
    assert a.dtype == torch.float8_e4m3fn and a.dim() == 2, f"a must be float8_e4m3fn [M, K], got {a.dtype}"
    (m, k), n = a.shape, w_packed.shape[0]
    assert tuple(a_scale.shape) == (m, k // 128) and a_scale.dtype == torch.float32, \
        f"a_scale {a_scale.dtype} {tuple(a_scale.shape)}, expected float32 {(m, k // 128)}"
    assert w_packed.shape[1] * 2 == k and tuple(w_scale_e8m0.shape) == (n, k // 32), \
        f"w_packed {tuple(w_packed.shape)} / w_scale_e8m0 {tuple(w_scale_e8m0.shape)} do not fit K={k}"
    return launch_gemm(row_major(a), row_major(w_packed), out_dtype, format_codes.MXFP4_W4A8, a_scale=a_scale,
                       w_scale=w_scale_e8m0, out=out, small_m=False)
