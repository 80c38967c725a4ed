"""Triton MLA attention over the paged latent cache: absorbed decode and chunked prefill, split-KV + LSE merge.

One kernel serves both entry points. A *row* is one query token: decode has one row per sequence,
prefill one per new token, each with its own visible length (causality = a shorter length). A
program owns (head block, row, KV split): it streams its share of the row's tokens through the
block table in BLOCK_N tiles; each tile is both key (Q.K^T) and value (P.V): the 512 latent values are
handled as four 128-wide chunks with their own accumulators. Online softmax runs in float32 with exp2.
With several splits each writes a float32 partial output and its log2-sum-exp; a second kernel merges
them. Head blocks are the fastest grid axis, so programs that read the same KV run together and the
repeats come from L2.

MMA operands per cache dtype:
    bf16     the tile as stored (pipelined into shared memory once, read by both dots).
    fp8      float16 MMAs on the exact float16 image of the E4M3 codes (one cvt.rn.f16x2.e4m3x2 per pair;
             a bf16 target needs a further F2F per value, which would make fp8 slower than bf16). q goes
             to float16 times a power of two per head, P times 2^15; kv_scale and both powers are folded
             into the logit scale and the output.
    fp8_ds   the same, each chunk's Q.K^T times its per-token group scale and P.V's P times the scale
             (in float16 times a power of two per tile), i.e. exactly the dequantized cache.
How the fp8 tile reaches the two dots is AttendConfig.tile ("dequant": bf16 tiles on bf16 MMAs).

Split count: from static sizes only (no host sync, CUDA-graph safe): the block table's capacity
bounds the context, and the split count trades partial-output traffic against SM wave fill.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.mla import gluon_decode
from dsquant.kernels.mla.cache import KV_LORA_RANK, ROPE_DIM
from dsquant.kernels.mla.configs import (
    TILE_CODE,
    AttendConfig,
    default_config,
    default_num_splits,
    num_sms,
    portable_config,
    programs_per_sm,
)
from dsquant.kernels.mla.store import cache_views
from dsquant.kernels.mla.tiles import (
    key_operand,
    load_kv_chunk,
    pow2_scale,
    pv_operand,
    pv_scaled,
    split_bounds,
    store_out_chunk,
    tile_slots,
)
from dsquant.kernels.mla.token_major import mla_attend_tokens_kernel

__all__ = ["AttendConfig", "default_config", "default_num_splits", "mla_decode", "mla_prefill"]

_LOG2E = 1.4426950408889634


# Sizes that vary per call are not specialized on (divisibility / == 1): one compile per tile config.
@triton.jit(do_not_specialize=["num_heads", "num_splits", "stride_bt", "stride_lse_r", "stride_lse_h"])
def mla_attend_kernel(
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
    MMA_BF16: tl.constexpr, EV: tl.constexpr, ASM: tl.constexpr,
):
    # The 512 latent dims are handled as four 128-wide chunks (the fp8_ds scale groups): Q.K^T becomes
    # five independent MMA chains instead of one 36-step dependent chain, and each fp8_ds chunk needs
    # one per-token scale.
    hb = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq, start, end = split_bounds(row_seq_ptr, row_len_ptr, row, split, num_splits, HAS_ROW_SEQ, BLOCK_N)

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
    if MMA_BF16:  # bf16 cache, or an fp8 cache dequantized to bf16 tiles
        if KV_FMT == format_codes.FP8_TENSOR:
            s_scale = s_scale * tl.load(kv_scale_ptr)
    else:
        qa = tl.maximum(tl.maximum(tl.abs(q0), tl.abs(q1)), tl.maximum(tl.abs(q2), tl.abs(q3)))
        qmax = tl.max(qa.to(tl.float32), axis=1)  # one row reduction (elementwise max first)
        if KV_FMT == format_codes.FP8_TENSOR:  # the rope part is fp8 too and shares q's multiplier
            qmax = tl.maximum(qmax, tl.max(tl.abs(qp).to(tl.float32), axis=1))
        q_mul, q_inv = pow2_scale(qmax, 14)
        q0 = (q0.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        q1 = (q1.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        q2 = (q2.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        q3 = (q3.to(tl.float32) * q_mul[:, None]).to(tl.float16)
        if KV_FMT == format_codes.FP8_TENSOR:
            qp = (qp.to(tl.float32) * q_mul[:, None]).to(tl.float16)
            # per-tensor fp8: scores scale by kv_scale, folded into the logit scale
            s_scale = s_scale * q_inv * tl.load(kv_scale_ptr)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    a0 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a1 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a2 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a3 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    r0 = tl.full([], 1.0, tl.float32)  # fp8_ds: the power of two each accumulator is held in (pv_scaled)
    r1 = tl.full([], 1.0, tl.float32)
    r2 = tl.full([], 1.0, tl.float32)
    r3 = tl.full([], 1.0, tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        slot, mask_n = tile_slots(bt_row, n0, end, PAGE_SIZE, BLOCK_N)
        # One tile per chunk feeds both dots (key of Q.K^T, value of P.V).
        k0 = load_kv_chunk(val_ptr, sc_ptr, slot, mask_n, 0, VAL_W, SC_W, SC_OFF, KV_FMT, GROUP, EV, TILE, ASM)
        k1 = load_kv_chunk(val_ptr, sc_ptr, slot, mask_n, 1, VAL_W, SC_W, SC_OFF, KV_FMT, GROUP, EV, TILE, ASM)
        k2 = load_kv_chunk(val_ptr, sc_ptr, slot, mask_n, 2, VAL_W, SC_W, SC_OFF, KV_FMT, GROUP, EV, TILE, ASM)
        k3 = load_kv_chunk(val_ptr, sc_ptr, slot, mask_n, 3, VAL_W, SC_W, SC_OFF, KV_FMT, GROUP, EV, TILE, ASM)
        kp = tl.load(pe_ptr + slot[:, None] * PE_W + PE_OFF + r[None, :], mask=mask_n[:, None], other=0.0)
        if MMA_BF16:
            s01 = tl.dot(q0, key_operand(k0)) + tl.dot(q1, key_operand(k1))
            s = s01 + (tl.dot(q2, key_operand(k2)) + tl.dot(q3, key_operand(k3)))
            s = s + tl.dot(qp, tl.trans(kp.to(tl.bfloat16)))  # [BLOCK_H, BLOCK_N] float32
        elif KV_FMT == format_codes.FP8_DS:
            # fp8_ds: each chunk's dot times its per-token group scale, exactly the dequantized key.
            ks0 = tl.load(sc_ptr + slot * SC_W + SC_OFF, mask=mask_n, other=0.0)
            ks1 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 1, mask=mask_n, other=0.0)
            ks2 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 2, mask=mask_n, other=0.0)
            ks3 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 3, mask=mask_n, other=0.0)
            s01 = tl.dot(q0, key_operand(k0)) * ks0[None, :] + tl.dot(q1, key_operand(k1)) * ks1[None, :]
            s = s01 + (tl.dot(q2, key_operand(k2)) * ks2[None, :] + tl.dot(q3, key_operand(k3)) * ks3[None, :])
            s = s * q_inv[:, None] + tl.dot(qp, tl.trans(kp))  # rope part: bf16 x bf16
        else:
            s01 = tl.dot(q0, key_operand(k0)) + tl.dot(q1, key_operand(k1))
            s = s01 + (tl.dot(q2, key_operand(k2)) + tl.dot(q3, key_operand(k3)))
            s = s + tl.dot(qp, tl.trans(kp.to(tl.float16)))
        s = tl.where(mask_n[None, :], s * s_scale[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        if MMA_BF16 or KV_FMT == format_codes.FP8_TENSOR:
            if MMA_BF16:
                pb = p.to(tl.bfloat16)
            else:  # float16 MMAs: P times 2^15 (undone in the output scale) keeps small weights out of subnormals
                pb = (p * 32768.0).to(tl.float16)
            a0 = tl.dot(pb, pv_operand(val_ptr, slot, mask_n, 0, VAL_W, KV_FMT, GROUP, TILE, k0),
                        a0 * alpha[:, None])
            a1 = tl.dot(pb, pv_operand(val_ptr, slot, mask_n, 1, VAL_W, KV_FMT, GROUP, TILE, k1),
                        a1 * alpha[:, None])
            a2 = tl.dot(pb, pv_operand(val_ptr, slot, mask_n, 2, VAL_W, KV_FMT, GROUP, TILE, k2),
                        a2 * alpha[:, None])
            a3 = tl.dot(pb, pv_operand(val_ptr, slot, mask_n, 3, VAL_W, KV_FMT, GROUP, TILE, k3),
                        a3 * alpha[:, None])
        else:
            a0, r0 = pv_scaled(p, alpha,
                               pv_operand(val_ptr, slot, mask_n, 0, VAL_W, KV_FMT, GROUP, TILE, k0),
                               ks0, a0, r0)
            a1, r1 = pv_scaled(p, alpha,
                               pv_operand(val_ptr, slot, mask_n, 1, VAL_W, KV_FMT, GROUP, TILE, k1),
                               ks1, a1, r1)
            a2, r2 = pv_scaled(p, alpha,
                               pv_operand(val_ptr, slot, mask_n, 2, VAL_W, KV_FMT, GROUP, TILE, k2),
                               ks2, a2, r2)
            a3, r3 = pv_scaled(p, alpha,
                               pv_operand(val_ptr, slot, mask_n, 3, VAL_W, KV_FMT, GROUP, TILE, k3),
                               ks3, a3, r3)

    has = l_i > 0.0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    if KV_FMT == format_codes.FP8_TENSOR and MMA_BF16:
        inv = inv * tl.load(kv_scale_ptr)
    elif KV_FMT == format_codes.FP8_TENSOR:
        inv = inv * (tl.load(kv_scale_ptr) * (1.0 / 32768.0))  # P went to float16 times 2^15
    if SPLIT:
        o_base = o_ptr + row * stride_o_r + offs_h[:, None] * stride_o_h + split * stride_o_s
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * stride_lse_r + offs_h * stride_lse_h + split, lse, mask=mask_h)
    else:
        o_base = o_ptr + row * stride_o_r + offs_h[:, None] * stride_o_h
    store_out_chunk(o_base, a0 * (inv / r0)[:, None], mask_h, 0, GROUP)
    store_out_chunk(o_base, a1 * (inv / r1)[:, None], mask_h, 1, GROUP)
    store_out_chunk(o_base, a2 * (inv / r2)[:, None], mask_h, 2, GROUP)
    store_out_chunk(o_base, a3 * (inv / r3)[:, None], mask_h, 3, GROUP)


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
    if cfg.tile == "gluon" and (kind == "bf16" or row_seq is not None or not gluon_decode.gluon_runs_on(q_nope.device)):
        cfg = portable_config(heads, kind)  # the Gluon kernel: fp8 decode on Hopper only
    assert cfg.tile != "gluon" or (cfg.block_h, cfg.block_n) == (gluon_decode.BLOCK_H, gluon_decode.BLOCK_N), cfg
    n_hb = triton.cdiv(heads, cfg.block_h)
    if num_splits is None:
        num_splits = default_num_splits(rows, heads, block_table.shape[1] * page_size, kind, cfg.block_h,
                                        num_sms(q_nope.device), programs_per_sm(cfg))
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
    args = (
        q_nope, q_pe, val, sc, pe, kv_scale if kind == "fp8" else val,
        block_table, row_seq if row_seq is not None else row_len, row_len,
        o, lse, softmax_scale * _LOG2E, heads, num_splits,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_table.stride(0),
        *so, *slse,
    )
    shared = dict(
        PAGE_SIZE=page_size, KV_FMT=format_codes.KV_CACHE_FORMATS[kind], HAS_ROW_SEQ=row_seq is not None,
        SPLIT=split, VAL_W=val_w, SC_W=sc_w, SC_OFF=sc_off, PE_W=pe_w, PE_OFF=pe_off,
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, DR=ROPE_DIM, GROUP=KV_LORA_RANK // 4,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.tile == "gluon":
        gluon_decode.launch_decode(q_nope, q_pe, kv_cache, kind, block_table, row_len, softmax_scale * _LOG2E,
                                   kv_scale, num_splits, o, lse, so, slse, heads)
    elif cfg.tile == "tokens" and kind != "bf16":
        mla_attend_tokens_kernel[(n_hb, rows, num_splits)](*args, **shared)
    else:
        mla_attend_kernel[(n_hb, rows, num_splits)](
            *args, **shared, TILE=TILE_CODE[cfg.tile], MMA_BF16=kind == "bf16" or cfg.tile == "dequant",
            EV="evict_last" if cfg.tile == "reload" else "", ASM=os.environ.get("TRITON_INTERPRET", "0") != "1",
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
