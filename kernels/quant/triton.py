"""Triton FP8 and INT8 quantizers: per-token, per-token-group (1 x 128, optionally fused with SiLU-and-mul),
128 x 128 weight blocks and their dequantization. Bit-identical to reference.py (dsquant.formats).

Exactness rules kept in every kernel (each is needed for codes to agree with the torch spec):
  - every quotient is the correctly rounded x / scale: tl.div_rn for the scales, exact_div.div_rn_shared
    for the elements (one exact reciprocal per group plus a Markstein correction, the same bits as div.rn);
  - float32 -> e4m3 and float32 -> bf16 casts round to nearest-even (Triton's default for downcasts).
Memory-bound: one read of the input, one write of codes and scales; tile sizes are fixed heuristics
(see "performance hyper-parameters", chosen by the sweep in benchmarks/results/quant_h100_sweep.csv),
never autotuned. Bandwidth against a device copy: benchmarks/results/quant_h100.csv.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from dsquant.kernels.exact_div import divide, silu_div
from dsquant.kernels.fp8_cast import cast_fp8, fp8_scale
from triton.language.extra import libdevice

from dsquant.formats.fp8 import FP8_BLOCK
from dsquant.formats.int8 import INT8_AMAX_FLOOR, INT8_MAX

_INT8_MAX = tl.constexpr(float(INT8_MAX))
_INT8_FLOOR = tl.constexpr(INT8_AMAX_FLOOR)
# 1.5 * 2^23: adding it to |y| < 2^22 leaves no fraction bits, so the float32 add itself rounds y to
# an integer with ties-to-even (torch.round); subtracting it back is exact.
_RINT_MAGIC = tl.constexpr(12582912.0)
_SILU_FAST_MIN = tl.constexpr(-85.0)  # below, 1 + exp(-gate) > 2^122: the SiLU division takes tl.div_rn

# performance hyper-parameters
TILE_ELEMS = 8192  # elements per program in the row-tiled kernels (here and FP4): 16 KiB of bf16 per CTA
MAX_BLOCK_K = 1024  # widest column tile of the row-tiled kernels (1 x 128 groups: 8 groups per row)
ROW_TILE_MAX = 16384  # per-token kernels hold a whole row up to this width, else read it twice (2nd from L2)
WEIGHT_BLOCK_WARPS = 8  # 128 x 128 weight tile = 64 elements per thread
# div_rn_shared instead of tl.div_rn per element: same bits, 13 instead of 22 instructions per element of the
# group kernel; memory-bound either way, it leaves headroom for faster memory.
FAST_DIVISION = True
# SiLU's gate / (1 + exp(-gate)) by div.rn's own fast path without its range check (exact_div.silu_div),
# tl.div_rn for tiles holding a gate below -85.
SILU_FAST_DIVISION = True
SILU_TILE_ELEMS = 2048  # outputs per program of silu_mul_quantize_fp8: the fastest tile of the sweep

_FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _warps(tile_elems: int) -> int:
    """About 32 elements (four 16-byte bf16 loads) per thread, 4 to 16 warps."""
    return max(4, min(16, tile_elems // 1024))


@triton.jit
def _cast_int8(x, scale, rcp, FAST_DIV: tl.constexpr):
    y = divide(x, scale, rcp, FAST_DIV)
    y = (y + _RINT_MAGIC) - _RINT_MAGIC
    return tl.clamp(y, -_INT8_MAX, _INT8_MAX).to(tl.int8)


@triton.jit
def _silu_mul_bf16(gate, up, EXACT_EXP: tl.constexpr, FAST_DIV: tl.constexpr):
    """float32 gate, up -> bf16(gate / (1 + exp(-gate)) * up), widened back to float32 (torch's silu order)."""
    if EXACT_EXP:
        e = libdevice.exp(-gate)  # __nv_expf, the expf torch's CUDA silu calls
    else:
        e = tl.exp(-gate)  # the interpreter cannot call libdevice; numpy's exp stands in
    return (silu_div(gate, 1.0 + e, EXACT_EXP, FAST_DIV) * up).to(tl.bfloat16).to(tl.float32)


@triton.jit(do_not_specialize=["M", "stride_sm", "stride_sg"])  # one compile for every batch size
def _quantize_fp8_group_kernel(
    x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    UE8M0: tl.constexpr, SILU_MUL: tl.constexpr, EXACT_EXP: tl.constexpr, FAST_DIV: tl.constexpr,
    SILU_FAST_DIV: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of x (or of SiLU(gate) * up, the up half K columns to the right)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x_offs = rows[:, None].to(tl.int64) * stride_xm + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        up = tl.load(x_ptr + x_offs + K, mask=mask, other=0.0).to(tl.float32)
        if SILU_FAST_DIV:
            if tl.min(tl.min(x, axis=1), axis=0) < _SILU_FAST_MIN:  # one scalar branch per program
                h = _silu_mul_bf16(x, up, EXACT_EXP, False)
            else:
                h = _silu_mul_bf16(x, up, EXACT_EXP, True)
            x = h
        else:
            x = _silu_mul_bf16(x, up, EXACT_EXP, False)
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    xg = tl.reshape(x, (BLOCK_M * GROUPS, GROUP))  # one row per 1 x GROUP group
    scale = fp8_scale(tl.max(tl.abs(xg), axis=1), UE8M0)  # [BLOCK_M * GROUPS]
    rcp = tl.div_rn(1.0, scale)[:, None]  # one exact division per group
    q = tl.reshape(cast_fp8(xg, scale[:, None], rcp, FAST_DIV), (BLOCK_M, BLOCK_K))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    g = tl.arange(0, BLOCK_M * GROUPS)
    s_rows = pid_m * BLOCK_M + g // GROUPS
    s_cols = pid_k * GROUPS + g % GROUPS
    s_mask = (s_rows < M) & (s_cols < K // GROUP)
    tl.store(scale_ptr + s_rows.to(tl.int64) * stride_sm + s_cols * stride_sg, scale, mask=s_mask)


@triton.jit(do_not_specialize=["M"])
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr,
    INT8: tl.constexpr, UE8M0: tl.constexpr, FAST_DIV: tl.constexpr,
):
    """BLOCK_M whole rows: amax over each row, then FP8 (or INT8) codes and one float32 scale per row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    q_row = q_ptr + rows[:, None].to(tl.int64) * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if CHUNKS == 1:
        mask = row_mask[:, None] & (cols[None, :] < K)
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(CHUNKS):
            k0 = c * BLOCK_K
            mask = row_mask[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_row + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    if INT8:
        scale = tl.div_rn(tl.maximum(amax, _INT8_FLOOR), _INT8_MAX)
    else:
        scale = fp8_scale(amax, UE8M0)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    rcp = tl.div_rn(1.0, scale)[:, None]
    s = scale[:, None]
    if CHUNKS == 1:
        q = _cast_int8(x, s, rcp, FAST_DIV) if INT8 else cast_fp8(x, s, rcp, FAST_DIV)
        tl.store(q_row + cols[None, :], q, mask=mask)
    else:
        for c in range(CHUNKS):
            k0 = c * BLOCK_K
            mask = row_mask[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_row + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q = _cast_int8(x, s, rcp, FAST_DIV) if INT8 else cast_fp8(x, s, rcp, FAST_DIV)
            tl.store(q_row + k0 + cols[None, :], q, mask=mask)


@triton.jit
def _quantize_fp8_block_kernel(w_ptr, q_ptr, scale_ptr, N, K, stride_wn, stride_qn,
                               BLOCK: tl.constexpr, UE8M0: tl.constexpr, FAST_DIV: tl.constexpr):
    """One BLOCK x BLOCK weight block; ragged edge blocks read as zero-padded (amax over real elements)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    scale = fp8_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), UE8M0)
    q = cast_fp8(w, scale, tl.div_rn(1.0, scale), FAST_DIV)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qn + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + pid_n * tl.num_programs(1) + pid_k, scale)


@triton.jit
def _dequantize_fp8_block_kernel(q_ptr, scale_ptr, out_ptr, N, K, stride_qn, stride_on, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qn + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + pid_n * tl.num_programs(1) + pid_k)
    w = (q.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :], w, mask=mask)


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """[..., K] -> a 2-D [M, K] view (a copy only when the last dim is strided)."""
    assert x.dtype in _FLOAT_INPUTS, f"{what}: dtype {x.dtype} not in {_FLOAT_INPUTS}"
    assert x.dim() >= 1 and x.shape[-1] > 0, f"{what}: needs a non-empty last dim, got shape {tuple(x.shape)}"
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_tiles(m: int, k: int, block: int, tile_elems: int | None = None):
    """(grid, BLOCK_M, BLOCK_K, num_warps) to walk an [m, k] tensor in tiles of whole `block`-wide groups.

    Up to MAX_BLOCK_K columns and tile_elems (default TILE_ELEMS) elements per program; the NVFP4/MXFP4
    kernels use it too.
    """
    block_k = max(block, min(triton.next_power_of_2(k), MAX_BLOCK_K))
    block_m = max(1, min(triton.next_power_of_2(m), (tile_elems or TILE_ELEMS) // block_k))
    return (triton.cdiv(m, block_m), triton.cdiv(k, block_k)), block_m, block_k, _warps(block_m * block_k)


def _group_launch(x2, q, scale, k, group_size, ue8m0, silu_mul):
    m = x2.shape[0]
    grid, block_m, block_k, warps = row_tiles(m, k, group_size, SILU_TILE_ELEMS if silu_mul else None)
    _quantize_fp8_group_kernel[grid](
        x2, q, scale, m, k, x2.stride(0), q.stride(0), scale.stride(0), scale.stride(1),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_K=block_k, UE8M0=ue8m0, SILU_MUL=silu_mul,
        EXACT_EXP=not _interpreting(), FAST_DIV=FAST_DIVISION, SILU_FAST_DIV=SILU_FAST_DIVISION, num_warps=warps,
    )


def _group_quantize(x, k, group_size, ue8m0, column_major_scales, silu_mul, what):
    assert group_size >= 16 and group_size & (group_size - 1) == 0, f"{what}: group_size {group_size} not 2^n >= 16"
    assert k % group_size == 0, f"{what}: K={k} is not a multiple of group_size={group_size}"
    assert not column_major_scales or x.dim() == 2, f"{what}: column-major scales need 2-D input, got {x.dim()}-D"
    x2 = _rows(x, what)
    m, groups = x2.shape[0], k // group_size
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    if column_major_scales:
        scale = torch.empty((groups, m), dtype=torch.float32, device=x.device).t()  # [M, G] view of [G, M]
    else:
        scale = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m > 0:
        _group_launch(x2, q, scale, k, group_size, ue8m0, silu_mul)
    lead = x.shape[:-1]
    return q.reshape(*lead, k), (scale if column_major_scales else scale.reshape(*lead, groups))


def quantize_fp8_per_token_group(
    x: torch.Tensor, group_size: int = FP8_BLOCK, ue8m0: bool = False, column_major_scales: bool = False
):
    """1 x group_size FP8 activation quantization (DeepSeek `act_quant`).

    Args:
        x: [..., K] bf16 / fp16 / fp32, K % group_size == 0 (group_size a power of two, 128 for DeepSeek).
        ue8m0: round each scale up to a power of two (DeepSeek-V3.1/V3.2 `scale_fmt: ue8m0`).
        column_major_scales: 2-D x only; scales written as a contiguous [K / group_size, M] buffer and
            returned as its [M, K / group_size] view (the layout torch._scaled_mm and DeepGEMM read).
    Returns:
        q float8_e4m3fn [..., K]; scale float32 [..., K / group_size] (multiplies to dequantize).
    """
    return _group_quantize(x, x.shape[-1], group_size, ue8m0, column_major_scales, False, "x")


def silu_mul_quantize_fp8(
    gate_up: torch.Tensor, group_size: int = FP8_BLOCK, ue8m0: bool = False, column_major_scales: bool = False
):
    """Fused SiLU(gate) * up and 1 x group_size FP8 quantization: the MoE down-projection input.

    The product is taken in float32 and rounded to bf16 before quantizing (reference.silu_mul_bf16_ref).
    Args:
        gate_up: [..., 2 * I] bf16 / fp16 / fp32, gate in [..., :I], up in [..., I:]; I % group_size == 0.
        ue8m0, column_major_scales: as in quantize_fp8_per_token_group.
    Returns:
        q float8_e4m3fn [..., I]; scale float32 [..., I / group_size].
    """
    assert gate_up.shape[-1] % 2 == 0, f"gate_up: last dim {gate_up.shape[-1]} must be even (gate | up)"
    return _group_quantize(gate_up, gate_up.shape[-1] // 2, group_size, ue8m0, column_major_scales, True, "gate_up")


def _per_token(x: torch.Tensor, int8: bool, ue8m0: bool):
    x2 = _rows(x, "x")
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8 if int8 else torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m > 0:
        block_k = min(triton.next_power_of_2(k), ROW_TILE_MAX)
        block_m = max(1, min(triton.next_power_of_2(m), TILE_ELEMS // block_k))
        _quantize_per_token_kernel[(triton.cdiv(m, block_m),)](
            x2, q, scale, m, k, x2.stride(0), q.stride(0),
            BLOCK_M=block_m, BLOCK_K=block_k, CHUNKS=triton.cdiv(k, block_k), INT8=int8, UE8M0=ue8m0,
            FAST_DIV=FAST_DIVISION, num_warps=_warps(block_m * block_k),
        )
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_fp8_per_token(x: torch.Tensor, ue8m0: bool = False):
    """Per-token (per-row) FP8: x [..., K] bf16/fp16/fp32 -> (q float8_e4m3fn [..., K]; scale float32 [..., 1])."""
    return _per_token(x, int8=False, ue8m0=ue8m0)


def quantize_int8_per_token(x: torch.Tensor):
    """Per-token symmetric INT8 (per-output-channel on weights): x [..., K] -> (q int8 [..., K]; scale f32 [..., 1])."""
    return _per_token(x, int8=True, ue8m0=False)


def quantize_fp8_block(w: torch.Tensor, ue8m0: bool = False):
    """128 x 128 block FP8 weight quantization (DeepSeek native `weight_scale_inv` layout).

    Args:
        w: [N, K] bf16 / fp16 / fp32; N and K need not be multiples of 128 (edge blocks are partial).
    Returns:
        q float8_e4m3fn [N, K]; scale float32 [ceil(N/128), ceil(K/128)] (multiplies to dequantize).
    """
    assert w.dim() == 2, f"w: block quantization needs a 2-D weight, got shape {tuple(w.shape)}"
    assert w.dtype in _FLOAT_INPUTS, f"w: dtype {w.dtype} not in {_FLOAT_INPUTS}"
    w = w if w.stride(-1) == 1 else w.contiguous()
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty((triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)), dtype=torch.float32, device=w.device)
    if q.numel() > 0:
        _quantize_fp8_block_kernel[scale.shape](w, q, scale, n, k, w.stride(0), q.stride(0),
                                                BLOCK=FP8_BLOCK, UE8M0=ue8m0, FAST_DIV=FAST_DIVISION,
                                                num_warps=WEIGHT_BLOCK_WARPS)
    return q, scale


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """q float8_e4m3fn [N, K], scale float32 [ceil(N/128), ceil(K/128)] -> dtype [N, K], W = q * scale."""
    assert q.dim() == 2 and q.dtype == torch.float8_e4m3fn, f"q: need 2-D float8_e4m3fn, got {q.dtype} {tuple(q.shape)}"
    assert dtype in _OUT_DTYPES, f"dtype {dtype} not in {_OUT_DTYPES}"
    n, k = q.shape
    nb, kb = triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(f"block scale shape {tuple(scale.shape)} does not fit weight {(n, k)}: expected {(nb, kb)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    scale = scale.float().contiguous()
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    if out.numel() > 0:
        _dequantize_fp8_block_kernel[(nb, kb)](q, scale, out, n, k, q.stride(0), out.stride(0),
                                               BLOCK=FP8_BLOCK, num_warps=WEIGHT_BLOCK_WARPS)
    return out
