"""Triton NVFP4 and MXFP4 quantizers and dequantizers, with E2M1 rounding in software (Hopper has no FP4
conversion instruction). Bit-identical to reference.py (dsquant.formats.nvfp4 / mxfp4 / fp4).

Quantizers: one thread holds whole 16- (NVFP4) or 32-element (MXFP4) blocks (_block_tile), so the block max,
the scale and the nibble packing are thread-local and the codes leave as int32 words of 8 nibbles. E2M1
rounding is one float add (e2m1_codes: ties to the even code, saturation at 6, sign from x < 0 so -0.0
is code 0 and a small negative that rounds to zero is code 8). MXFP4 multiplies by the exact power of two
2^-e, the same rounding of the same real number as dividing by 2^e. NVFP4 divides in the order the format
docstring states, each quotient correctly rounded (Triton's `/` is div.full.f32, up to 2 ulp off, which
would move exact ties): by one exact reciprocal per block and a Markstein correction per element
(exact_div.div_rn_shared_unsigned), with tl.div_rn for any program whose tile holds a block outside that
method's range.
NVFP4 with the global scale computed reads its input twice (the amax pre-pass, then the quantizer).
Bandwidth against a device copy: benchmarks/results/quant_h100.csv; tile sizes: quant_h100_sweep.csv.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from dsquant.kernels.exact_div import div_rn_shared_unsigned
from dsquant.kernels.quant.triton import row_tiles

from dsquant.formats.fp4 import FP4_E2M1_MAX
from dsquant.formats.fp8 import FP8_E4M3_MAX
from dsquant.formats.mxfp4 import E8M0_BIAS, MXFP4_BLOCK, MXFP4_SCALE_RULES
from dsquant.formats.nvfp4 import NVFP4_BLOCK, NVFP4_GLOBAL_DIVISOR

_E2M1_MAX = tl.constexpr(FP4_E2M1_MAX)
_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
_NV_DIVISOR = tl.constexpr(NVFP4_GLOBAL_DIVISOR)
_E8M0_BIAS = tl.constexpr(E8M0_BIAS)
_RCP_E2M1_MAX = tl.constexpr(float(np.float32(1.0) / np.float32(FP4_E2M1_MAX)))  # rn(1/6) in float32
_TWO_POW_100 = tl.constexpr(2.0**100)
_TWO_POW_M100 = tl.constexpr(2.0**-100)

# performance hyper-parameters (tile sizes: row_tiles in triton.py)
AMAX_BLOCK = 8192  # elements per step of the global-amax pre-pass (four 16-byte loads per thread)
AMAX_STEPS = 4  # unrolled steps per program (32 Ki elements): loads in flight, few one-address atomics
# one exact reciprocal per block and div_rn_shared_unsigned per element, tl.div_rn only for out-of-range tiles
NVFP4_FAST_DIVISION = True
# Elements per program of the FP4 quantizers, the fastest of the sweep (benchmarks/results/quant_h100_sweep.csv):
# NVFP4 one warp, so that its range flag needs no barrier; MXFP4 4096.
NVFP4_TILE_ELEMS = 1024
MXFP4_TILE_ELEMS = 4096
QUANT_ELEMS_PER_THREAD = 32  # their warps: the tile over this many elements per thread (64: the same or slower)

_FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def e2m1_codes(x):
    """float32 (already divided by its scale) -> int32 E2M1 codes 0..15, equal to fp4.round_to_e2m1.

    One float add rounds every magnitude: a = min(|x|, 6) plus c = 2^(E + 22), E = max(floor(log2 a), 0),
    lands where the float32 step is 2^(E - 1), the E2M1 step at a's exponent (0.5 below 2, then 1, then 2),
    so the add itself rounds a to the grid, ties to even; the grid index k = bits(a + c) - bits(c) plus
    2E is the code (the parities of k and of the code agree, so ties go to the even code). Clamping to 6
    first saturates (6 < a <= 7 rounds to 6; 5 ties to 4) and keeps E <= 2. Seven instructions for the
    magnitude, against eleven for a two-case bit trick and 21 for seven threshold compares.
    Sign from x < 0: -0.0 stays code 0, a negative that rounds to zero is code 8.
    """
    a = tl.minimum(tl.abs(x), _E2M1_MAX)
    ec = tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 0x3F800000)  # 2^E as float32 bits
    c = ec + (22 << 23)
    k = (a + c.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - c
    return (k + ((ec >> 22) - 254)) | tl.where(x < 0, 8, 0)  # (ec >> 22) - 254 = 2E


@triton.jit
def _e2m1_to_float(codes):
    """uint8 codes 0..15 -> float32 by building the bits: magnitude m >= 2 is 2^(m//2 - 1) * (1 + (m & 1) / 2)."""
    c = codes.to(tl.int32)
    mag = c & 7
    bits = tl.where(mag >= 2, (((mag >> 1) + 126) << 23) | ((mag & 1) << 22), tl.where(mag == 1, 0x3F000000, 0))
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _unpack(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint8 [ROWS, COLS // 2] -> codes [ROWS, COLS]."""
    return tl.reshape(tl.join(packed & 0x0F, packed >> 4), (ROWS, COLS))


@triton.jit
def _e8m0_to_float(b):
    """E8M0 byte (int32 0..255) -> float32 2^(b - 127); b = 0 is the subnormal 2^-127 = 2^22 * 2^-149."""
    return tl.where(b > 0, b << 23, 1 << 22).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_reciprocal(b):
    """E8M0 byte (int32 0..254) -> float32 2^(127 - b), exact; b = 254 gives the subnormal 2^-127."""
    return tl.where(b < 254, (254 - b) << 23, 1 << 22).to(tl.float32, bitcast=True)


@triton.jit
def _absmax_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """max |x| over a flat tensor into one int32 slot (non-negative float32 bits order like the floats)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(STEPS):  # unrolled: all loads issue before the first max
        offs = base + s * BLOCK + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def _tile(M, K, stride_m, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    return rows, cols, rows[:, None].to(tl.int64) * stride_m + cols[None, :], (rows[:, None] < M) & (cols[None, :] < K)


@triton.jit
def _block_tile(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile as [BLOCK_M * BLOCK_K / BLOCK, BLOCK / 8, 8]: element (b, j, i) of block b sits at column
    col0(b) + 8 j + i of row(b). Returns per block (row, first column, mask), and j and i.

    Why this shape: the 8 along the last axis is one 16-byte load of bf16; Triton's layout gives the next threads
    to the first of the equally non-contiguous axes, the blocks, and the pieces j of a block to the same thread
    (check: TTGIR sizePerThread [1, BLOCK / 8, 8]), which makes the block max, the
    scale and the nibble packing thread-local (no shuffles, no shared memory) and amortizes the scale over 16
    (NVFP4) or 32 (MXFP4) elements per thread instead of 8. A warp's 16-byte loads are 32 (NVFP4) or 64 bytes
    apart; the other pieces of the same sectors are read by the next loads of the same threads, from L1.
    """
    BPR: tl.constexpr = BLOCK_K // BLOCK  # blocks per tile row
    blk = tl.arange(0, BLOCK_M * BPR)
    rows = tl.program_id(0) * BLOCK_M + blk // BPR
    cols = tl.program_id(1) * BLOCK_K + (blk % BPR) * BLOCK
    return rows, cols, (rows < M) & (cols < K), tl.arange(0, BLOCK // 8)[None, :, None], tl.arange(0, 8)[None, None, :]


@triton.jit
def load_blocks(x_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """x's tile as float32 [blocks, BLOCK / 8, 8] (see _block_tile), its |max| per block, and the block coordinates."""
    rows, cols, mask, j, i = _block_tile(M, K, BLOCK_M, BLOCK_K, BLOCK)
    offs = (rows.to(tl.int64) * stride_xm + cols)[:, None, None] + j * 8 + i
    x = tl.load(x_ptr + offs, mask=mask[:, None, None], other=0.0).to(tl.float32)
    return x, tl.max(tl.max(tl.abs(x), axis=2), axis=1), rows, cols, mask


@triton.jit
def _pack_words(codes):
    """codes int32 [blocks, pieces, 8] -> int32 words [blocks, pieces] of 8 nibbles, element 2i in the low nibble of
    byte i (the little-endian uint8 order); thread-local. The shifted nibbles do not overlap: the sum is their OR."""
    return tl.sum(codes << (tl.arange(0, 8) * 4)[None, None, :], axis=2)


@triton.jit
def store_blocks(words, scale, rows, cols, mask, pw_ptr, s_ptr, stride_pw, stride_sm, BLOCK: tl.constexpr):
    """words [blocks, BLOCK / 8] through pw_ptr (the packed uint8 output seen as int32) and scales [blocks]."""
    j = tl.arange(0, BLOCK // 8)[None, :]
    tl.store(pw_ptr + (rows.to(tl.int64) * stride_pw + cols // 8)[:, None] + j, words, mask=mask[:, None])
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + cols // BLOCK, scale, mask=mask)


@triton.jit
def _nvfp4_exact(x, block_amax, gs):
    """Block scales [blocks] and code words of x [blocks, pieces, 8] by the spec's divisions, tl.div_rn throughout."""
    scale = tl.minimum(tl.div_rn(tl.div_rn(block_amax, _E2M1_MAX), gs), _FP8_MAX).to(tl.float8e4nv)
    denom = (scale.to(tl.float32) * gs)[:, None, None]
    safe = tl.where(denom > 0, denom, 1.0)  # a block whose e4m3 scale underflows to 0 gets code 0
    return scale, _pack_words(e2m1_codes(tl.where(denom > 0, tl.div_rn(x, safe), 0.0)))


@triton.jit
def nvfp4_fast_scales(x, block_amax, gs):
    """_nvfp4_exact's block scales with the divisions by 6 and by gs done as div_rn_shared_unsigned (rn(1/6) is a
    constant, 1/gs one division per program), the divisor and exact reciprocal per block for nvfp4_fast_words, and
    `bad`.

    bad is true when a block of the tile leaves the range where div_rn_shared_unsigned gives div.rn's bits, and the
    caller takes _nvfp4_exact for the tile. The range: the global scale, the block amax and the unclamped scale
    quotient within 2^+-100 (normal operands and quotients, no overflow of x * r), and no negative element below
    2^-100 of its block amax (its quotient could be subnormal, where the sign of a zero code, 0 or 8, hangs on
    the last bit). -0.0 also trips that test (its int32 bits are the smallest ones); its fast quotient is +0.0,
    code 0 like the spec's, so that is caution only. Decided before the per-element work, so that the branch
    (one CTA-wide reduction) comes right after the loads and each path packs its own codes.
    """
    t = div_rn_shared_unsigned(div_rn_shared_unsigned(block_amax, _E2M1_MAX, _RCP_E2M1_MAX), gs, tl.div_rn(1.0, gs))
    scale = tl.minimum(t, _FP8_MAX).to(tl.float8e4nv)
    denom = scale.to(tl.float32) * gs
    safe = tl.where(denom > 0, denom, 1.0)
    rcp = tl.where(denom > 0, tl.div_rn(1.0, safe), 0.0)
    low = tl.min(tl.min(x.to(tl.int32, bitcast=True), axis=2), axis=1)  # the least negative element's bits
    tiny_neg = (low < 0) & ((low & 0x7FFFFFFF).to(tl.float32, bitcast=True) * _TWO_POW_100 < block_amax)
    in_range = ((t == 0) | ((t > _TWO_POW_M100) & (t < _TWO_POW_100))) & (
        (block_amax == 0) | (block_amax > _TWO_POW_M100)) & ~tiny_neg
    ok = (tl.min(in_range.to(tl.int32), axis=0) > 0) & (gs > _TWO_POW_M100) & (gs < _TWO_POW_100)
    return scale, safe, rcp, ~ok


@triton.jit
def nvfp4_fast_words(x, safe, rcp):
    """Code words of x [blocks, pieces, 8]: div_rn_shared_unsigned per element, 3 FMA-pipe instructions instead of
    div.rn's ~20."""
    return _pack_words(e2m1_codes(div_rn_shared_unsigned(x, safe[:, None, None], rcp[:, None, None])))


@triton.jit(do_not_specialize=["M"])
def _quantize_nvfp4_kernel(
    x_ptr, pw_ptr, s_ptr, gs_ptr, gs_out_ptr, M, K, stride_xm, stride_pw, stride_sm,
    AMAX_GIVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
    FAST_DIV: tl.constexpr,
):
    """gs_ptr holds the global scale, or (AMAX_GIVEN) the tensor amax bits, turned into amax / 2688 here."""
    if AMAX_GIVEN:
        amax = tl.load(gs_ptr).to(tl.float32, bitcast=True)  # int32 view of the amax slot
        gs = tl.where(amax > 0, tl.div_rn(amax, _NV_DIVISOR), 1.0)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(gs_out_ptr, gs)
    else:
        gs = tl.load(gs_ptr)
    x, block_amax, rows, cols, mask = load_blocks(x_ptr, M, K, stride_xm, BLOCK_M, BLOCK_K, BLOCK)
    if FAST_DIV:
        scale, safe, rcp, bad = nvfp4_fast_scales(x, block_amax, gs)
        if bad:  # one scalar branch per program: free on data inside the range
            scale, words = _nvfp4_exact(x, block_amax, gs)
        else:
            words = nvfp4_fast_words(x, safe, rcp)
    else:
        scale, words = _nvfp4_exact(x, block_amax, gs)
    store_blocks(words, scale, rows, cols, mask, pw_ptr, s_ptr, stride_pw, stride_sm, BLOCK)


@triton.jit(do_not_specialize=["M"])
def _quantize_mxfp4_kernel(x_ptr, pw_ptr, s_ptr, M, K, stride_xm, stride_pw, stride_sm,
                           CEIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    x, block_amax, rows, cols, mask = load_blocks(x_ptr, M, K, stride_xm, BLOCK_M, BLOCK_K, BLOCK)
    bits = block_amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - _E8M0_BIAS - 2  # floor(log2 amax) - emax(E2M1), the OCP rule
    if CEIL:
        e += ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)  # mantissa > 1.5: the max would clip at 6
    b = tl.minimum(tl.maximum(e, -_E8M0_BIAS), _E8M0_BIAS) + _E8M0_BIAS
    # x / 2^e == x * 2^-e bit for bit: 2^-e is exact, so both are the one rounding of the same real number
    words = _pack_words(e2m1_codes(x * _e8m0_reciprocal(b)[:, None, None]))
    store_blocks(words, b.to(tl.uint8), rows, cols, mask, pw_ptr, s_ptr, stride_pw, stride_sm, BLOCK)


@triton.jit(do_not_specialize=["M"])
def _dequantize_fp4_kernel(p_ptr, s_ptr, gs_ptr, out_ptr, M, K, stride_pm, stride_sm, stride_om,
                           NVFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """E2M1 value * scale in float32, then one rounding to the output dtype (NVFP4: scale = e4m3 * global)."""
    _, _, p_offs, p_mask = _tile(M, K // 2, stride_pm, BLOCK_M, BLOCK_K // 2)
    values = _e2m1_to_float(_unpack(tl.load(p_ptr + p_offs, mask=p_mask, other=0), BLOCK_M, BLOCK_K))
    _, _, s_offs, s_mask = _tile(M, K // BLOCK, stride_sm, BLOCK_M, BLOCK_K // BLOCK)
    if NVFP4:
        s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32) * tl.load(gs_ptr)
    else:
        s = _e8m0_to_float(tl.load(s_ptr + s_offs, mask=s_mask, other=0).to(tl.int32))
    vb = tl.reshape(values, (BLOCK_M * BLOCK_K // BLOCK, BLOCK)) * tl.reshape(s, (BLOCK_M * BLOCK_K // BLOCK,))[:, None]
    _, _, o_offs, o_mask = _tile(M, K, stride_om, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + o_offs, tl.reshape(vb, (BLOCK_M, BLOCK_K)).to(out_ptr.dtype.element_ty), mask=o_mask)


def _quant_tiles(m: int, k: int, block: int, tile_elems: int):
    """row_tiles' grid and tile of tile_elems for the FP4 quantizers, QUANT_ELEMS_PER_THREAD setting the warps."""
    grid, block_m, block_k, _ = row_tiles(m, k, block, tile_elems)
    return grid, block_m, block_k, max(1, min(16, block_m * block_k // (32 * QUANT_ELEMS_PER_THREAD)))


def _rows(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    assert x.dtype in _FLOAT_INPUTS, f"{what}: dtype {x.dtype} not in {_FLOAT_INPUTS}"
    assert x.dim() >= 1 and x.shape[-1] % block == 0, f"{what}: last dim of {tuple(x.shape)} not a multiple of {block}"
    return x.reshape(-1, x.shape[-1]).contiguous()


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    """NVFP4 quantization: E2M1 codes, an E4M3 scale per 16 along K, a float32 global scale.

    Args:
        x: [..., K] bf16 / fp16 / fp32, K % 16 == 0.
        global_scale: float32 one-element tensor (> 0) on x's device, or None to use amax(|x|) / 2688,
            computed on the device (an extra read of x, no host sync).
    Returns:
        packed uint8 [..., K/2]; block_scale float8_e4m3fn [..., K/16]; global_scale float32 [].
    """
    x2 = _rows(x, NVFP4_BLOCK, "x")
    m, k = x2.shape
    packed = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, k // NVFP4_BLOCK), dtype=torch.float8_e4m3fn, device=x.device)
    if global_scale is None:
        gs_in = torch.zeros((), dtype=torch.float32, device=x.device)  # amax bits, max-reduced by atomics
        gs_out = torch.ones((), dtype=torch.float32, device=x.device)  # 1.0 stays for an empty tensor
        if x2.numel() > 0:
            step = AMAX_BLOCK * AMAX_STEPS
            _absmax_kernel[(triton.cdiv(x2.numel(), step),)](x2, gs_in.view(torch.int32), x2.numel(),
                                                            BLOCK=AMAX_BLOCK, STEPS=AMAX_STEPS, num_warps=8)
    else:
        assert global_scale.numel() == 1, f"global_scale must hold one value, got shape {tuple(global_scale.shape)}"
        assert global_scale.device == x.device, f"global_scale on {global_scale.device}, x on {x.device}"
        gs_in = gs_out = global_scale.float().reshape(()).contiguous()
    if x2.numel() > 0:
        grid, block_m, block_k, warps = _quant_tiles(m, k, NVFP4_BLOCK, NVFP4_TILE_ELEMS)
        gs_arg = gs_in.view(torch.int32) if global_scale is None else gs_in
        pw = packed.view(torch.int32)  # 8 codes per word: k / 2 bytes per row is a multiple of 8
        _quantize_nvfp4_kernel[grid](
            x2, pw, scale, gs_arg, gs_out, m, k, x2.stride(0), pw.stride(0), scale.stride(0),
            AMAX_GIVEN=global_scale is None, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK=NVFP4_BLOCK,
            FAST_DIV=NVFP4_FAST_DIVISION, num_warps=warps,
        )
    lead = x.shape[:-1]
    return packed.reshape(*lead, k // 2), scale.reshape(*lead, k // NVFP4_BLOCK), gs_out


def quantize_mxfp4(x: torch.Tensor, scale_rule: str = "ocp"):
    """MXFP4 quantization: E2M1 codes and one E8M0 scale per 32 along K.

    Args:
        x: [..., K] bf16 / fp16 / fp32, K % 32 == 0.
        scale_rule: "ocp" (OCP MX v1.0: floor(log2 amax) - 2) or "ceil" (no clipping of the block max).
    Returns:
        packed uint8 [..., K/2]; scale uint8 E8M0 bytes [..., K/32].
    """
    if scale_rule not in MXFP4_SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {scale_rule!r}; choose one of {MXFP4_SCALE_RULES}")
    x2 = _rows(x, MXFP4_BLOCK, "x")
    m, k = x2.shape
    packed = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, k // MXFP4_BLOCK), dtype=torch.uint8, device=x.device)
    if x2.numel() > 0:
        grid, block_m, block_k, warps = _quant_tiles(m, k, MXFP4_BLOCK, MXFP4_TILE_ELEMS)
        pw = packed.view(torch.int32)
        _quantize_mxfp4_kernel[grid](x2, pw, scale, m, k, x2.stride(0), pw.stride(0), scale.stride(0),
                                     CEIL=scale_rule == "ceil", BLOCK_M=block_m, BLOCK_K=block_k,
                                     BLOCK=MXFP4_BLOCK, num_warps=warps)
    lead = x.shape[:-1]
    return packed.reshape(*lead, k // 2), scale.reshape(*lead, k // MXFP4_BLOCK)


def _dequantize(packed, scale, global_scale, dtype, block, what):
    assert packed.dtype == torch.uint8, f"{what}: packed must be uint8, got {packed.dtype}"
    assert dtype in _OUT_DTYPES, f"{what}: dtype {dtype} not in {_OUT_DTYPES}"
    k = packed.shape[-1] * 2
    lead = packed.shape[:-1]
    if k % block or tuple(scale.shape) != (*lead, k // block):
        raise ValueError(f"{what}: scale shape {tuple(scale.shape)} does not fit packed {tuple(packed.shape)}")
    p2 = packed.reshape(-1, k // 2).contiguous()
    s2 = scale.reshape(-1, k // block).contiguous()
    m = p2.shape[0]
    out = torch.empty((m, k), dtype=dtype, device=packed.device)
    if out.numel() > 0:
        grid, block_m, block_k, warps = row_tiles(m, k, block)
        gs = s2 if global_scale is None else global_scale.float().reshape(()).contiguous()  # unused for MXFP4
        _dequantize_fp4_kernel[grid](p2, s2, gs, out, m, k, p2.stride(0), s2.stride(0), out.stride(0),
                                     NVFP4=global_scale is not None, BLOCK_M=block_m, BLOCK_K=block_k,
                                     BLOCK=block, num_warps=warps)
    return out.reshape(*lead, k)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(packed uint8 [..., K/2], block_scale float8_e4m3fn [..., K/16], global_scale f32 []) -> dtype [..., K]."""
    assert block_scale.dtype == torch.float8_e4m3fn, f"block_scale must be float8_e4m3fn, got {block_scale.dtype}"
    return _dequantize(packed, block_scale, global_scale, dtype, NVFP4_BLOCK, "nvfp4")


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(packed uint8 [..., K/2], scale E8M0 uint8 [..., K/32]) -> dtype [..., K]."""
    assert scale.dtype == torch.uint8, f"scale must be uint8 E8M0 bytes, got {scale.dtype}"
    return _dequantize(packed, scale, None, dtype, MXFP4_BLOCK, "mxfp4")
