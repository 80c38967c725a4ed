"""Tile-level pieces of the GEMM kernels in triton.py (inlined by Triton): weight tile loads and
decodes per format, the FP8 step scale and the epilogue's scaling. W_FMT is a format_codes code.
"""

from __future__ import annotations

import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.fp4_decode import e2m1_float32, e2m1_groups_bf16, e8m0_to_bf16


@triton.jit
def _e2m1_decode(packed):
    """uint8 [R, C], two E2M1 codes per byte -> float32 [R, 2C]; element 2i is the low nibble."""
    p = packed.to(tl.int32)
    return e2m1_float32(tl.reshape(tl.join(p & 0xF, p >> 4), (packed.shape[0], 2 * packed.shape[1])))


@triton.jit
def load_weight(w_desc, ws_ptr, stride_wsn, stride_wsk, off_n, off_k, N, K,
                W_FMT: tl.constexpr, SCALE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One weight tile [BLOCK_N, BLOCK_K]: the stored codes for FP8/INT8, bf16 values for FP4."""
    if W_FMT == format_codes.NVFP4 or W_FMT == format_codes.MXFP4:
        packed = w_desc.load([off_n, off_k // 2])  # [BLOCK_N, BLOCK_K // 2] uint8
        offs_n = off_n + tl.arange(0, BLOCK_N)
        offs_g = off_k // SCALE_GROUP + tl.arange(0, BLOCK_K // SCALE_GROUP)
        mask = (offs_n[:, None] < N) & (offs_g[None, :] < K // SCALE_GROUP)
        s = tl.load(ws_ptr + offs_n[:, None] * stride_wsn + offs_g[None, :] * stride_wsk, mask=mask)
        scale = s.to(tl.bfloat16) if W_FMT == format_codes.NVFP4 else e8m0_to_bf16(s)
        scale = tl.where(mask, scale, 0.0).to(tl.bfloat16)  # past N or K: a masked byte may read as NaN
        even, odd = e2m1_groups_bf16(packed, scale, SCALE_GROUP)  # exact: E2M1 x (E4M3 or 2^e) fits bf16
        w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # element 2i is the low nibble of byte i
    else:
        w = w_desc.load([off_n, off_k])
    return w


@triton.jit
def load_mxfp4_as_fp8(w_desc, ws_ptr, stride_wsn, stride_wsk, off_n, off_k, N, K,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """MXFP4 tile -> (float8e4nv values [BLOCK_N, BLOCK_K], float32 row scale [BLOCK_N]), tile = values * scale.

    Each 32-wide block's E8M0 exponent is taken relative to the largest of the row's BLOCK_K / 32 and
    folded into the E4M3 value: E2M1 times 2^-d is exact in E4M3 for d <= 8 (its subnormals reach 2^-9);
    a block more than 2^8 below its row's largest is rounded to that grid.
    """
    vals = _e2m1_decode(w_desc.load([off_n, off_k // 2]))  # [BLOCK_N, BLOCK_K] fp32
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_g = off_k // 32 + tl.arange(0, BLOCK_K // 32)
    mask = (offs_n[:, None] < N) & (offs_g[None, :] < K // 32)
    e = tl.load(ws_ptr + offs_n[:, None] * stride_wsn + offs_g[None, :] * stride_wsk, mask=mask, other=0)
    e = e.to(tl.int32)
    e_max = tl.max(e, axis=1)  # [BLOCK_N]
    d = e - e_max[:, None]  # <= 0
    rel = tl.where(d > -127, (d + 127) << 23, 0).to(tl.float32, bitcast=True)  # 2^d
    w = tl.reshape(vals, (BLOCK_N, BLOCK_K // 32, 32)) * rel[:, :, None]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(tl.float8e4nv)
    return w, tl.where(e_max > 0, e_max << 23, 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def dot_scaled_mxfp4(acc, a, w_desc, ws_ptr, stride_wsn, stride_wsk, off_n, off_k, N, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + a @ W^T with W read as packed E2M1 codes and E8M0 scales by FP4 tensor cores (sm_100+).

    Compiled only where `launch_gemm` finds compute capability >= 10; Triton emulates `tl.dot_scaled`
    elsewhere, which is how tests/kernels/test_gemm_kernels.py checks it on Hopper.
    """
    packed = w_desc.load([off_n, off_k // 2])  # [BLOCK_N, BLOCK_K // 2] uint8
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_g = off_k // 32 + tl.arange(0, BLOCK_K // 32)
    mask = (offs_n[:, None] < N) & (offs_g[None, :] < K // 32)
    s = tl.load(ws_ptr + offs_n[:, None] * stride_wsn + offs_g[None, :] * stride_wsk, mask=mask, other=0)
    return tl.dot_scaled(a, None, "bf16", packed.T, s, "e2m1", acc)


@triton.jit
def fp8_step_scale(a_scale_ptr, w_scale_ptr, stride_asm, stride_ask, stride_wsn, stride_wsk, offs_m, offs_n, M, N, ki,
                   SCALE_GROUP: tl.constexpr):
    """FP8 block K step ki: 1x128 activation scales x the 128x128 weight-block scales -> fp32 [BLOCK_M, BLOCK_N]."""
    w_s = tl.load(w_scale_ptr + (offs_n // SCALE_GROUP) * stride_wsn + ki * stride_wsk, mask=offs_n < N, other=0.0)
    a_s = tl.load(a_scale_ptr + offs_m * stride_asm + ki * stride_ask, mask=offs_m < M, other=0.0)
    return a_s[:, None] * w_s[None, :]


@triton.jit
def epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, stride_asm, stride_wsn, global_scale_ptr,
             W_FMT: tl.constexpr):
    """Per-format output scaling of an accumulator [BLOCK_M, BLOCK_N] -> float32 (bias excluded)."""
    if W_FMT == format_codes.INT8:
        a_s = tl.load(a_scale_ptr + offs_m * stride_asm, mask=offs_m < M, other=0.0)
        w_s = tl.load(w_scale_ptr + offs_n * stride_wsn, mask=offs_n < N, other=0.0)
        out = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    elif W_FMT == format_codes.NVFP4:
        out = acc * tl.load(global_scale_ptr)
    else:
        out = acc
    return out
