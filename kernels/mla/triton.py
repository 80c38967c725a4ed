"""Triton MLA attention over the paged latent cache: absorbed decode and chunked prefill, split-KV + LSE merge.

One kernel serves both entry points. A *row* is one query token: decode has one row per sequence,
prefill one per new token, each with its own visible length (causality = a shorter length). A
program owns (head block, row, KV split): it streams its share of the row's tokens through the
block table in BLOCK_N tiles, dequantizes each tile once to bf16 (bf16: as is; fp8: E4M3 -> bf16
is exact, the per-tensor scale is folded into the logits and the output; fp8_ds: q * group scale
rounded to bf16, as FlashMLA does) and uses the same tile for Q.K^T and P.V (the 512 latent
values are both key and value). The latent is handled as four 128-wide chunks with their own
accumulators. Online softmax runs in float32 with exp2. With several splits each writes a float32
partial output and its log2-sum-exp; a second kernel merges them. Head blocks are the fastest grid
axis, so programs that read the same KV run together and the repeats come from L2.

Split count: from static sizes only (no host sync, CUDA-graph safe): the block table's capacity
bounds the context, and the split count trades partial-output traffic against SM wave fill.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from dsquant.kernels.mla.cache import KV_LORA_RANK, ROPE_DIM, kv_cache_bytes_per_token
from dsquant.kernels.mla.store import cache_views

_FMT = {"bf16": 0, "fp8": 1, "fp8_ds": 2}
_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_chunk(val_ptr, slot, mask_n, G: tl.constexpr, VAL_W: tl.constexpr, KV_FMT: tl.constexpr,
                   GROUP: tl.constexpr, EVICT: tl.constexpr, TILE: tl.constexpr):
    """Latent values [G*128, (G+1)*128) of BLOCK_N tokens [BLOCK_N, 128] as MMA operands (masked tokens read 0):
    bf16 as stored; fp8 codes as float16, exact (one cvt.rn.f16x2.e4m3x2 per pair; a bf16 target costs a
    further F2F per value), scales applied outside the tile (see the kernel)."""
    c = tl.arange(0, GROUP)
    kq = tl.load(val_ptr + slot[:, None] * VAL_W + G * GROUP + c[None, :], mask=mask_n[:, None], other=0.0,
                 eviction_policy=EVICT)
    if TILE == 2 and KV_FMT != 0:
        # Converted here, once, into a float16 tile that both dots read from shared memory (ldmatrix). The
        # mask multiply (a no-op: masked tokens already read 0) keeps the compiler from moving the conversion
        # past the shared-memory read, where it would convert per dot and gather P.V's 8-bit operand byte by
        # byte (a select does the same at one SEL per value; an inline-asm cvt is moved like a plain cast).
        return kq.to(tl.float16) * mask_n.to(tl.float16)[:, None]
    else:
        return kq


@triton.jit
def _kt(k):
    if k.dtype != tl.float8e4nv:
        return tl.trans(k)
    else:
        return tl.trans(k).to(tl.float16)


@triton.jit
def _kv(k):
    if k.dtype != tl.float8e4nv:
        return k
    else:
        return k.to(tl.float16)


@triton.jit
def _reload(val_ptr, slot, mask_n, G: tl.constexpr, VAL_W: tl.constexpr, KV_FMT: tl.constexpr, GROUP: tl.constexpr,
            TILE: tl.constexpr, k):
    if TILE == 1:
        return _load_kv_chunk(val_ptr, slot, mask_n, G, VAL_W, KV_FMT, GROUP, "evict_first", TILE)
    else:
        return k


@triton.jit
def _pow2_scale(x, TOP: tl.constexpr):
    """(2^(TOP - e), 2^(e - TOP)) for x >= 0 in [2^e, 2^(e+1)): x * first < 2^(TOP+1). Exact powers of two
    from the exponent bits; e clamped to [-100, 100] so zero / padding rows stay finite."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -100), 100)
    return (((127 + TOP) - e) << 23).to(tl.float32, bitcast=True), (((127 - TOP) + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pv_scaled(p, alpha, kq, ks, acc, acc_mul):
    """fp8_ds P.V for one chunk: (p * ks) @ codes with p * ks in float16 times a power of two per tile (max in
    [2^14, 2^15): float16 keeps 11 bits where bf16 keeps 8). The accumulator stays in the multiplier of the
    last tile (acc_mul), so a change of multiplier costs nothing beyond the alpha rescale: returns (acc, mul)."""
    mul, _ = _pow2_scale(tl.max(ks, axis=0), 14)
    pg = (p * (ks * mul)[None, :]).to(tl.float16)
    return tl.dot(pg, kq, acc * (alpha * (mul / acc_mul))[:, None]), mul


@triton.jit
def _store_out_chunk(o_base, o, mask_h, G: tl.constexpr, GROUP: tl.constexpr):
    c = tl.arange(0, GROUP)
    tl.store(o_base + G * GROUP + c[None, :], o.to(o_base.dtype.element_ty), mask=mask_h[:, None])


# Sizes that vary per call are not specialized on (divisibility / == 1): one compile per tile config.
@triton.jit(do_not_specialize=["num_heads", "num_splits", "stride_bt", "stride_lse_r", "stride_lse_h"])
def _mla_attend_kernel(
    qn_ptr, qp_ptr,  # [R, H, 512], [R, H, 64] bf16
    val_ptr, sc_ptr, pe_ptr, kv_scale_ptr,  # cache views (store.cache_views), float32 [] for "fp8"
    bt_ptr, row_seq_ptr, row_len_ptr,  # [B, max_pages] int32, [R] int32 (if HAS_ROW_SEQ), [R] int32
    o_ptr, lse_ptr,  # SPLIT: float32 [R, H, S, 512] and [R, H, S]; else [R, H, 512] output
    qk_scale, num_heads, num_splits,
    stride_qn_r, stride_qn_h, stride_qp_r, stride_qp_h, stride_bt,
    stride_o_r, stride_o_h, stride_o_s, stride_lse_r, stride_lse_h,
    PAGE_SIZE: tl.constexpr, KV_FMT: tl.constexpr, HAS_ROW_SEQ: tl.constexpr, SPLIT: tl.constexpr,
    VAL_W: tl.constexpr, SC_W: tl.constexpr, SC_OFF: tl.constexpr, PE_W: tl.constexpr, PE_OFF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DR: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
):
    # The 512 latent dims are handled as four 128-wide chunks (the fp8_ds scale groups): Q.K^T becomes
    # five independent MMA chains instead of one 36-step dependent chain, and each fp8_ds chunk needs
    # one per-token scale. H100, batch 64, 4K, 16 heads, bf16, same tiles (h16n64w8s3, 2 splits):
    # 238 -> 132 us against one [BLOCK_N, 512] tile (results/mla_h100_before_chunking.csv).
    hb = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    if HAS_ROW_SEQ:
        seq = tl.load(row_seq_ptr + row).to(tl.int64)
    else:
        seq = row
    kv_len = tl.load(row_len_ptr + row)
    # Each split takes a whole number of tiles; trailing splits of a short row may be empty.
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, kv_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    c = tl.arange(0, GROUP)
    r = tl.arange(0, DR)
    q_base = qn_ptr + row * stride_qn_r + offs_h[:, None] * stride_qn_h + c[None, :]
    q0 = tl.load(q_base, mask=mask_h[:, None], other=0.0)
    q1 = tl.load(q_base + GROUP, mask=mask_h[:, None], other=0.0)
    q2 = tl.load(q_base + 2 * GROUP, mask=mask_h[:, None], other=0.0)
    q3 = tl.load(q_base + 3 * GROUP, mask=mask_h[:, None], other=0.0)
    qp_base = qp_ptr + row * stride_qp_r + offs_h[:, None] * stride_qp_h
    qp = tl.load(qp_base + r[None, :], mask=mask_h[:, None], other=0.0)
    # Per-head logit multiplier. fp8 caches run float16 MMAs on the exact fp16 image of the E4M3 codes;
    # q moves to float16 times a power of two per head (max |q| in [2^14, 2^15): no overflow, bf16's 8
    # mantissa bits kept), undone here. P goes to float16 times 2^15 (p <= 1), undone on the output.
    s_scale = tl.full([BLOCK_H], 1.0, tl.float32) * qk_scale
    if KV_FMT != 0:
        qa = tl.maximum(tl.maximum(tl.abs(q0), tl.abs(q1)), tl.maximum(tl.abs(q2), tl.abs(q3)))
        qmax = tl.max(qa.to(tl.float32), axis=1)  # one row reduction (elementwise max first)
        if KV_FMT == 1:  # the rope part is fp8 too and shares q's multiplier
            qmax = tl.maximum(qmax, tl.max(tl.abs(qp).to(tl.float32), axis=1))
        q_mul, q_inv = _pow2_scale(qmax, 14)
        q0 = (q0.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        q1 = (q1.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        q2 = (q2.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        q3 = (q3.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        if KV_FMT == 1:
            qp = (qp.to(tl.float32) * q_mul[:, None]).to(tl.float16)
            # per-tensor fp8: scores scale by kv_scale, folded into the logit scale
            s_scale = s_scale * q_inv * tl.load(kv_scale_ptr)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    a0 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a1 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a2 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a3 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    r0 = tl.full([], 1.0, tl.float32)  # fp8_ds: the power of two each accumulator is held in (_pv_scaled)
    r1 = tl.full([], 1.0, tl.float32)
    r2 = tl.full([], 1.0, tl.float32)
    r3 = tl.full([], 1.0, tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # Masked tokens read nothing (other=0): NaN in unused slots or pages never reaches P.V.
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + offs_n % PAGE_SIZE
        # One converted tile per chunk feeds both dots (key of Q.K^T, value of P.V).
        k0 = _load_kv_chunk(val_ptr, slot, mask_n, 0, VAL_W, KV_FMT, GROUP, "evict_last" if TILE == 1 else "", TILE)
        k1 = _load_kv_chunk(val_ptr, slot, mask_n, 1, VAL_W, KV_FMT, GROUP, "evict_last" if TILE == 1 else "", TILE)
        k2 = _load_kv_chunk(val_ptr, slot, mask_n, 2, VAL_W, KV_FMT, GROUP, "evict_last" if TILE == 1 else "", TILE)
        k3 = _load_kv_chunk(val_ptr, slot, mask_n, 3, VAL_W, KV_FMT, GROUP, "evict_last" if TILE == 1 else "", TILE)
        kp = tl.load(pe_ptr + slot[:, None] * PE_W + PE_OFF + r[None, :], mask=mask_n[:, None], other=0.0)
        if KV_FMT == 2:
            # fp8_ds: each chunk's dot times its per-token group scale, exactly the dequantized key.
            ks0 = tl.load(sc_ptr + slot * SC_W + SC_OFF, mask=mask_n, other=0.0)
            ks1 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 1, mask=mask_n, other=0.0)
            ks2 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 2, mask=mask_n, other=0.0)
            ks3 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 3, mask=mask_n, other=0.0)
            s01 = tl.dot(q0, _kt(k0)) * ks0[None, :] + tl.dot(q1, _kt(k1)) * ks1[None, :]
            s = s01 + (tl.dot(q2, _kt(k2)) * ks2[None, :] + tl.dot(q3, _kt(k3)) * ks3[None, :])
            s = s * q_inv[:, None] + tl.dot(qp, tl.trans(kp))  # rope part: bf16 x bf16
        else:
            s01 = tl.dot(q0, _kt(k0)) + tl.dot(q1, _kt(k1))
            s = s01 + (tl.dot(q2, _kt(k2)) + tl.dot(q3, _kt(k3)))
            s = s + tl.dot(qp, tl.trans(kp.to(qp.dtype)))  # [BLOCK_H, BLOCK_N] float32
        s = tl.where(mask_n[None, :], s * s_scale[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        if KV_FMT == 0:
            pb = p.to(tl.bfloat16)
            a0 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 0, VAL_W, KV_FMT, GROUP, TILE, k0)), a0 * alpha[:, None])
            a1 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 1, VAL_W, KV_FMT, GROUP, TILE, k1)), a1 * alpha[:, None])
            a2 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 2, VAL_W, KV_FMT, GROUP, TILE, k2)), a2 * alpha[:, None])
            a3 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 3, VAL_W, KV_FMT, GROUP, TILE, k3)), a3 * alpha[:, None])
        elif KV_FMT == 1:
            pb = (p * 32768.0).to(tl.float16)
            a0 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 0, VAL_W, KV_FMT, GROUP, TILE, k0)), a0 * alpha[:, None])
            a1 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 1, VAL_W, KV_FMT, GROUP, TILE, k1)), a1 * alpha[:, None])
            a2 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 2, VAL_W, KV_FMT, GROUP, TILE, k2)), a2 * alpha[:, None])
            a3 = tl.dot(pb, _kv(_reload(val_ptr, slot, mask_n, 3, VAL_W, KV_FMT, GROUP, TILE, k3)), a3 * alpha[:, None])
        else:
            a0, r0 = _pv_scaled(p, alpha, _kv(_reload(val_ptr, slot, mask_n, 0, VAL_W, KV_FMT, GROUP, TILE, k0)), ks0, a0, r0)
            a1, r1 = _pv_scaled(p, alpha, _kv(_reload(val_ptr, slot, mask_n, 1, VAL_W, KV_FMT, GROUP, TILE, k1)), ks1, a1, r1)
            a2, r2 = _pv_scaled(p, alpha, _kv(_reload(val_ptr, slot, mask_n, 2, VAL_W, KV_FMT, GROUP, TILE, k2)), ks2, a2, r2)
            a3, r3 = _pv_scaled(p, alpha, _kv(_reload(val_ptr, slot, mask_n, 3, VAL_W, KV_FMT, GROUP, TILE, k3)), ks3, a3, r3)

    has = l_i > 0.0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    if KV_FMT == 1:
        inv = inv * (tl.load(kv_scale_ptr) * (1.0 / 32768.0))
    if SPLIT:
        o_base = o_ptr + row * stride_o_r + offs_h[:, None] * stride_o_h + split * stride_o_s
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * stride_lse_r + offs_h * stride_lse_h + split, lse, mask=mask_h)
    else:
        o_base = o_ptr + row * stride_o_r + offs_h[:, None] * stride_o_h
    _store_out_chunk(o_base, a0 * (inv / r0)[:, None], mask_h, 0, GROUP)
    _store_out_chunk(o_base, a1 * (inv / r1)[:, None], mask_h, 1, GROUP)
    _store_out_chunk(o_base, a2 * (inv / r2)[:, None], mask_h, 2, GROUP)
    _store_out_chunk(o_base, a3 * (inv / r3)[:, None], mask_h, 3, GROUP)


@triton.jit(do_not_specialize=["num_splits", "stride_p_r", "stride_p_h", "stride_lse_r", "stride_lse_h"])
def _mla_merge_kernel(
    part_ptr, lse_ptr, out_ptr,  # float32 [R, H, S, 512], float32 [R, H, S] (log2 domain), [R, H, 512]
    num_splits,
    stride_p_r, stride_p_h, stride_p_s, stride_lse_r, stride_lse_h, stride_out_r, stride_out_h,
    BLOCK_S: tl.constexpr, D: tl.constexpr,
):
    h = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    mask_s = s < num_splits
    lse = tl.load(lse_ptr + row * stride_lse_r + h * stride_lse_h + s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    denom = tl.sum(w, axis=0)
    d = tl.arange(0, D)
    part = tl.load(part_ptr + row * stride_p_r + h * stride_p_h + s[:, None] * stride_p_s + d[None, :],
                   mask=mask_s[:, None], other=0.0)  # [BLOCK_S, 512]
    out = tl.sum(part * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + row * stride_out_r + h * stride_out_h + d, out.to(out_ptr.dtype.element_ty))


_TILE = {"regs": 0, "reload": 1, "smem": 2}
_TILE_TAG = {"regs": "", "reload": "r", "smem": "m"}


class AttendConfig(NamedTuple):
    """Tile sizes and launch parameters of _mla_attend_kernel."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    # fp8 caches, how the tile reaches the two dots: "regs" each dot converts its own register copy (P.V's
    # 8-bit operand gathered byte by byte), "reload" each dot reads the tile from global memory (second read
    # from L2), "smem" one float16 tile in shared memory feeds both (ldmatrix). bf16 tiles: always "smem".
    tile: str = "regs"

    def __str__(self) -> str:
        return f"h{self.block_h}n{self.block_n}w{self.num_warps}s{self.num_stages}" + _TILE_TAG[self.tile]


# performance hyper-parameters: the fastest of the configs timed on an H100 at batch 64, 4K context
# (benchmarks/results/mla_h100.csv). <= 16 heads (memory-bound): 16-row head blocks on mma.sync,
# 64-token tiles; a bf16 tile feeds both dots straight from shared memory (8 warps, 3 stages: 127 us,
# 79% of copy bandwidth), while fp8 tiles are converted in registers, where 4 warps and 2 stages did
# best (185 / 172 us for fp8 / fp8_ds vs 224 / 206 us). More heads: 64-row head blocks for wgmma,
# 64-token tiles (221 KB of shared memory for bf16); 32-token tiles were 1.3-1.4x slower.
# 32 heads pad to a 64-row block: a 32-row mma.sync block ran 3.3x slower than a 64-row wgmma one at
# 64 heads (results/mla_h100_before_chunking.csv, 799 vs 240 us).
def default_config(num_heads: int, kind: str) -> AttendConfig:
    if kind == "bf16":
        return AttendConfig(16, 64, 8, 3) if num_heads <= 16 else AttendConfig(64, 64, 8, 2)
    if num_heads <= 16:
        return AttendConfig(16, 64, 4, 2, "reload") if kind == "fp8" else AttendConfig(16, 32, 4, 3, "reload")
    return AttendConfig(64, 64, 8, 2, "reload")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def default_num_splits(rows: int, num_heads: int, max_kv: int, kind: str, block_h: int, n_sms: int) -> int:
    """Splits per row minimising KV time / wave fill + partial-output traffic (static sizes only).

    Every row is assumed to use the block table's full capacity `max_kv`; a split is worth its
    float32 partial output (written and read back) only while programs do not fill the SMs. A
    16-row head block is small enough (<= 128 registers, < 100 KB shared) for 2 programs per SM.
    """
    slots = n_sms * (2 if block_h <= 16 else 1)
    base = rows * triton.cdiv(num_heads, block_h)
    kv_bytes = rows * max_kv * kv_cache_bytes_per_token(kind)
    best, best_cost = 1, float("inf")
    for splits in range(1, 65):
        if splits > 1 and max_kv < 256 * splits:
            break
        programs = base * splits
        fill = programs / (math.ceil(programs / slots) * slots)
        partial = 0 if splits == 1 else 2 * rows * num_heads * splits * (KV_LORA_RANK + 1) * 4
        cost = kv_bytes / fill + partial
        if cost < best_cost * 0.98:  # a split must win clearly to be worth it
            best, best_cost = splits, cost
    return best


def _attend(q_nope, q_pe, kv_cache, block_table, row_seq, row_len, softmax_scale, kv_scale,
            num_splits, out_dtype, config):
    kind, val, val_w, sc, sc_w, sc_off, pe, pe_w, pe_off = cache_views(kv_cache)
    rows, heads = q_nope.shape[0], q_nope.shape[1]
    assert q_nope.dim() == 3 and q_nope.shape[2] == KV_LORA_RANK, f"q_nope {tuple(q_nope.shape)}: [R, H, 512]"
    assert q_pe.shape == (rows, heads, ROPE_DIM), f"q_pe {tuple(q_pe.shape)}: [R, H, 64]"
    assert q_nope.dtype == q_pe.dtype == torch.bfloat16, f"q dtypes {q_nope.dtype}/{q_pe.dtype}: bf16"
    assert q_nope.stride(2) == 1 and q_pe.stride(2) == 1, "q_nope/q_pe: last dim contiguous"
    assert block_table.dim() == 2 and block_table.dtype == torch.int32, f"block_table {block_table.dtype}: int32 2-D"
    assert block_table.stride(1) == 1 and kv_cache.is_contiguous(), "block_table rows / kv_cache contiguous"
    assert row_len.shape == (rows,) and row_len.dtype == torch.int32, f"lengths {row_len.dtype}: int32 [R]"
    assert rows <= 65535, f"{rows} query rows: at most 65535 per call"
    if kind == "fp8":
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8 cache needs its float32 per-tensor scale")
        assert kv_scale.numel() == 1 and kv_scale.dtype == torch.float32, "kv_scale: float32 scalar"
    page_size = kv_cache.shape[1]
    cfg = config or default_config(heads, kind)
    n_hb = triton.cdiv(heads, cfg.block_h)
    if num_splits is None:
        num_splits = default_num_splits(rows, heads, block_table.shape[1] * page_size, kind, cfg.block_h,
                                        _num_sms(q_nope.device))
    out = torch.empty(rows, heads, KV_LORA_RANK, dtype=out_dtype or q_nope.dtype, device=q_nope.device)
    if rows == 0:
        return out
    split = num_splits > 1
    if split:
        o = torch.empty(rows, heads, num_splits, KV_LORA_RANK, dtype=torch.float32, device=q_nope.device)
        lse = torch.empty(rows, heads, num_splits, dtype=torch.float32, device=q_nope.device)
        so, slse = (o.stride(0), o.stride(1), o.stride(2)), (lse.stride(0), lse.stride(1))
    else:
        o, lse = out, out
        so, slse = (out.stride(0), out.stride(1), 0), (0, 0)
    _mla_attend_kernel[(n_hb, rows, num_splits)](
        q_nope, q_pe, val, sc, pe, kv_scale if kind == "fp8" else val,
        block_table, row_seq if row_seq is not None else row_len, row_len,
        o, lse, softmax_scale * _LOG2E, heads, num_splits,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_table.stride(0),
        *so, *slse,
        PAGE_SIZE=page_size, KV_FMT=_FMT[kind], HAS_ROW_SEQ=row_seq is not None, SPLIT=split,
        VAL_W=val_w, SC_W=sc_w, SC_OFF=sc_off, PE_W=pe_w, PE_OFF=pe_off,
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, DR=ROPE_DIM, GROUP=KV_LORA_RANK // 4, TILE=_TILE[cfg.tile],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        _mla_merge_kernel[(heads, rows)](
            o, lse, out, num_splits, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), BLOCK_S=triton.next_power_of_2(num_splits), D=KV_LORA_RANK, num_warps=4,
        )
    return out


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
    config: AttendConfig | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: one new token per sequence over its paged latent cache (see mla_decode_ref).

    Args:
        q_nope: [B, H, 512] bf16, q_nope already multiplied by wkv_b's K half. q_pe: [B, H, 64] bf16, roped.
        kv_cache: one layer's pool (cache.py layouts; dtype picks bf16 / fp8 / fp8_ds).
        block_table: [B, max_pages] int32. seq_lens: [B] int32, tokens cached including the new one
            (0 gives a zero output row).
        softmax_scale: logit scale (DeepSeek: qk_head_dim**-0.5 * mscale**2).
        kv_scale: float32 [] for an "fp8" cache. num_splits: KV splits per sequence (None: heuristic).
        out_dtype: default q_nope.dtype. config: tile override (benchmarks).
    Returns:
        [B, H, 512] latent output; the caller applies wkv_b's V half.
    """
    assert seq_lens.shape == (q_nope.shape[0],), f"seq_lens {tuple(seq_lens.shape)} vs batch {q_nope.shape[0]}"
    assert block_table.shape[0] >= q_nope.shape[0], "block_table has fewer rows than the batch"
    return _attend(q_nope, q_pe, kv_cache, block_table, None, seq_lens, softmax_scale, kv_scale,
                   num_splits, out_dtype, config)


def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    softmax_scale: float,
    kv_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: AttendConfig | None = None,
) -> torch.Tensor:
    """Chunked prefill / extend over the paged cache, causal (see mla_prefill_ref). No host sync.

    Args:
        q_nope: [T, H, 512] bf16, q_pe: [T, H, 64] bf16: the new tokens of all sequences back to back.
        kv_cache: the pool, already holding each sequence's prefix AND its new tokens (cache_store first).
        block_table: [B, max_pages] int32. seq_lens: [B] int32, tokens cached including the new ones.
        query_start_loc: [B + 1] int32 cumulative query counts (sequence b owns rows qsl[b]..qsl[b+1]).
        softmax_scale, kv_scale, out_dtype, config: as mla_decode.
    Returns:
        [T, H, 512] latent output.
    """
    t = q_nope.shape[0]
    b = seq_lens.shape[0]
    assert query_start_loc.shape == (b + 1,), f"query_start_loc {tuple(query_start_loc.shape)}: [B + 1] for B={b}"
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    row_seq = torch.repeat_interleave(torch.arange(b, device=q_nope.device), q_lens, output_size=t)  # [T]
    # Row t of sequence b sits at position seq_len - q_len + (t - qsl[b]) and sees that many + 1 tokens.
    offset = seq_lens.long() - q_lens - query_start_loc[:-1].long()  # [B]
    row_len = (torch.arange(t, device=q_nope.device) + offset[row_seq] + 1).to(torch.int32)
    return _attend(q_nope, q_pe, kv_cache, block_table, row_seq.to(torch.int32), row_len, softmax_scale,
                   kv_scale, None, out_dtype, config)
