"""Tile-level Triton helpers of the MLA attend kernel (triton.py): KV chunk loads per tile schedule, the
power-of-two multipliers of the float16 path, fp8_ds P.V and the output store. Shapes: BLOCK_N tokens x
128 latent values per chunk, BLOCK_H heads. TILE is configs.TILE_CODE: 0 regs, 1 reload, 2 smem, 3 dequant, 4 smem16;
KV_FMT is a format_codes code."""

from __future__ import annotations

import triton
import triton.language as tl
from dsquant.kernels import format_codes


@triton.jit
def load_kv_chunk(val_ptr, sc_ptr, slot, mask_n, G: tl.constexpr, VAL_W: tl.constexpr, SC_W: tl.constexpr,
                  SC_OFF: tl.constexpr, KV_FMT: tl.constexpr, GROUP: tl.constexpr, EVICT: tl.constexpr,
                  TILE: tl.constexpr, ASM: tl.constexpr):
    """Latent values [G*128, (G+1)*128) of BLOCK_N tokens, [BLOCK_N, 128] (masked tokens read 0), as the dots
    take them: bf16 as stored; "dequant": fp8 -> bf16 (fp8_ds: q * group scale rounded to bf16, as FlashMLA);
    "smem" / "smem16": the exact float16 image of the E4M3 codes; "regs" / "reload": the codes (converted at
    each dot). ASM: inline PTX allowed (False under the interpreter, which has none)."""
    c = tl.arange(0, GROUP)
    kq = tl.load(val_ptr + slot[:, None] * VAL_W + G * GROUP + c[None, :], mask=mask_n[:, None], other=0.0,
                 eviction_policy=EVICT)
    if TILE == 3 and KV_FMT == format_codes.FP8_DS:
        ks = tl.load(sc_ptr + slot * SC_W + SC_OFF + G, mask=mask_n, other=0.0)
        return (kq.to(tl.float32) * ks[:, None]).to(tl.bfloat16)
    elif TILE == 3:
        return kq.to(tl.bfloat16)
    elif TILE == 2 and KV_FMT != format_codes.BF16:
        # Converted here, once, into a float16 tile that both dots read from shared memory (ldmatrix). The
        # mask multiply (a no-op: masked tokens already read 0) keeps the compiler from moving the conversion
        # past the shared-memory read, where it would convert per dot and gather P.V's 8-bit operand byte by
        # byte (a select does the same at one SEL per value; an inline-asm cvt is moved like a plain cast).
        return kq.to(tl.float16) * mask_n.to(tl.float16)[:, None]
    elif TILE == 4 and KV_FMT != format_codes.BF16 and ASM:
        # As "smem", pinned by an identity PTX move that the compiler may not look through (it has side
        # effects): besides keeping the conversion here, this stops the operand-width search that else
        # traces the tile back to its 8-bit load and gives both dots an 8-bit operand layout (LDS.64 and
        # register moves instead of ldmatrix: 982 -> 546 SASS instructions per warp per 32-token tile).
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [kq.to(tl.float16)], dtype=tl.float16,
                                         is_pure=False, pack=2)
    elif TILE == 4 and KV_FMT != format_codes.BF16:
        return kq.to(tl.float16) * mask_n.to(tl.float16)[:, None]  # the interpreter: "smem"'s numbers
    else:
        return kq


@triton.jit
def key_operand(k):
    """Q.K^T's B operand [128, BLOCK_N]: 8-bit codes become float16 after the transpose (per dot)."""
    if k.dtype != tl.float8e4nv:
        return tl.trans(k)
    else:
        return tl.trans(k).to(tl.float16)


@triton.jit
def pv_operand(val_ptr, slot, mask_n, G: tl.constexpr, VAL_W: tl.constexpr, KV_FMT: tl.constexpr,
               GROUP: tl.constexpr, TILE: tl.constexpr, k):
    """P.V's B operand [BLOCK_N, 128]: under "reload" the chunk read again (a second, L2-hit read), else the
    Q.K^T tile `k`; 8-bit codes become float16 (per dot)."""
    if TILE == 1:
        k = load_kv_chunk(val_ptr, val_ptr, slot, mask_n, G, VAL_W, VAL_W, 0, KV_FMT, GROUP, "evict_first", TILE,
                          False)
    if k.dtype != tl.float8e4nv:
        return k
    else:
        return k.to(tl.float16)


@triton.jit
def pow2_scale(x, TOP: tl.constexpr):
    """(2^(TOP - e), 2^(e - TOP)) for x >= 0 in [2^e, 2^(e+1)): x * first < 2^(TOP+1). Exact powers of two
    from the exponent bits; e clamped to [-100, 100] so zero / padding rows stay finite."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -100), 100)
    mul = (((127 + TOP) - e) << 23).to(tl.float32, bitcast=True)
    return mul, (((127 - TOP) + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pv_scaled(p, alpha, kq, ks, acc, acc_mul):
    """fp8_ds P.V for one chunk: (p * ks) @ codes with p * ks in float16 times a power of two per tile (max in
    [2^14, 2^15): float16 keeps 11 bits where bf16 keeps 8). The accumulator stays in the multiplier of the
    last tile (acc_mul), so a change of multiplier costs nothing beyond the alpha rescale: returns (acc, mul)."""
    mul, _ = pow2_scale(tl.max(ks, axis=0), 14)
    pg = (p * (ks * mul)[None, :]).to(tl.float16)
    return tl.dot(pg, kq, acc * (alpha * (mul / acc_mul))[:, None]), mul


@triton.jit
def store_out_chunk(o_base, o, mask_h, G: tl.constexpr, GROUP: tl.constexpr):
    c = tl.arange(0, GROUP)
    tl.store(o_base + G * GROUP + c[None, :], o.to(o_base.dtype.element_ty), mask=mask_h[:, None])


@triton.jit
def split_bounds(row_seq_ptr, row_len_ptr, row, split, num_splits, HAS_ROW_SEQ: tl.constexpr, BLOCK_N: tl.constexpr):
    """(sequence of query row `row`, first and end token of split `split` of its KV). Each split takes a whole
    number of tiles; trailing splits of a short row may be empty."""
    if HAS_ROW_SEQ:
        seq = tl.load(row_seq_ptr + row).to(tl.int64)
    else:
        seq = row
    kv_len = tl.load(row_len_ptr + row)
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    return seq, start, tl.minimum(start + per_split, kv_len)


@triton.jit
def tile_slots(bt_row, n0, end, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(flat cache slots, validity) of tokens n0 .. n0 + BLOCK_N of a sequence whose block-table row is bt_row.
    Masked tokens look nothing up (page 0), and their loads read nothing either (other=0), so NaN in unused
    slots or pages never reaches P.V."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    return page * PAGE_SIZE + offs_n % PAGE_SIZE, mask_n
