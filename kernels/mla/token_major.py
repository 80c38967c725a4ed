"""MLA decode over an fp8 / fp8_ds latent cache with the tokens as the MMA's M dimension (few heads).

At 16 heads a head-major tile (heads x tokens) is 16 rows: mma.sync, the whole query held in every
warp's registers, long dependent MMA chains, two programs of four warps per SM. Here the tile is
transposed: scores are S^T = K . Q^T ([BLOCK_N tokens, BLOCK_H heads], K = 576) and the output is
O^T = V^T . P^T ([512, BLOCK_H], K = BLOCK_N tokens), so BLOCK_N = 64 tokens fill a wgmma's 64 rows,
q^T sits once in shared memory as the B operand, and the accumulator is 64 float32 per thread.

Arithmetic is that of triton.py's float16 path, so the same tolerances hold: each E4M3 code becomes its
exact float16 image, q goes to float16 times a power of two per head, P to float16 times 2^15 ("fp8",
kv_scale folded into the logit and output scales); fp8_ds scales each chunk's scores by the token's group
scale and multiplies P by it for P.V, in float16 times a power of two per tile (tiles.pv_scaled's rule),
the rope part in bf16. The softmax denominator is kept per element and reduced once after the loop.

The program grid and the split-KV partial outputs are triton.py's (this kernel writes the same partial /
LSE buffers, which its merge kernel reduces); it runs in the interpreter, so the CPU tests cover it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.mla.tiles import pow2_scale, split_bounds, tile_slots


@triton.jit
def _chunk_f16(val_ptr, slot, mask_n, G: tl.constexpr, VAL_W: tl.constexpr, GROUP: tl.constexpr):
    """Latent values [G*128, (G+1)*128) of BLOCK_N tokens as the exact float16 image of their codes."""
    c = tl.arange(0, GROUP)
    kq = tl.load(val_ptr + slot[:, None] * VAL_W + G * GROUP + c[None, :], mask=mask_n[:, None], other=0.0)
    return kq.to(tl.float16)


@triton.jit
def _q_chunk_t(q_row, offs_h, mask_h, stride_qn_h, G: tl.constexpr, GROUP: tl.constexpr):
    """q_nope[:, G*128:(G+1)*128] transposed, [128, BLOCK_H] bf16."""
    c = tl.arange(0, GROUP)
    return tl.load(q_row + offs_h[None, :] * stride_qn_h + G * GROUP + c[:, None], mask=mask_h[None, :], other=0.0)


@triton.jit
def _pv_ds(p, alpha, k, ks, acc, acc_mul):
    """fp8_ds P.V of one chunk, transposed: acc [128, BLOCK_H] += codes^T . (p * ks) with p * ks in float16
    times a power of two per tile; the accumulator stays in the last tile's multiplier (tiles.pv_scaled)."""
    mul, _ = pow2_scale(tl.max(ks, axis=0), 14)
    pg = (p * (ks * mul)[:, None]).to(tl.float16)
    return tl.dot(tl.trans(k), pg, acc * (alpha * (mul / acc_mul))[None, :]), mul


@triton.jit
def _store_t(o_base, acc, scale, mask_h, stride_o_h, G: tl.constexpr, GROUP: tl.constexpr):
    """acc [128, BLOCK_H] * scale[head] into out[head, G*128 : (G+1)*128]."""
    c = tl.arange(0, GROUP)
    offs = tl.arange(0, acc.shape[1])
    ptrs = o_base + offs[None, :] * stride_o_h + G * GROUP + c[:, None]
    tl.store(ptrs, (acc * scale[None, :]).to(o_base.dtype.element_ty), mask=mask_h[None, :])


@triton.jit(do_not_specialize=["num_heads", "num_splits", "stride_bt", "stride_lse_r", "stride_lse_h"])
def mla_attend_tokens_kernel(
    qn_ptr, qp_ptr,  # [R, H, 512], [R, H, 64] bf16
    val_ptr, sc_ptr, pe_ptr, kv_scale_ptr,  # cache views (store.cache_views), float32 [] for "fp8"
    bt_ptr, row_seq_ptr, row_len_ptr,  # [B, max_pages] int32, [R] int32 (if HAS_ROW_SEQ), [R] int32
    o_ptr, lse_ptr,  # SPLIT: float32 [R, H, S, 512] and [R, H, S]; else [R, H, 512] output
    qk_scale, num_heads, num_splits,
    stride_qn_r, stride_qn_h, stride_qp_r, stride_qp_h, stride_bt,
    stride_o_r, stride_o_h, stride_o_s, stride_lse_r, stride_lse_h,
    PAGE_SIZE: tl.constexpr, KV_FMT: tl.constexpr, HAS_ROW_SEQ: tl.constexpr, SPLIT: tl.constexpr,
    VAL_W: tl.constexpr, SC_W: tl.constexpr, SC_OFF: tl.constexpr, PE_W: tl.constexpr, PE_OFF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DR: tl.constexpr, GROUP: tl.constexpr,
):
    hb = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq, start, end = split_bounds(row_seq_ptr, row_len_ptr, row, split, num_splits, HAS_ROW_SEQ, BLOCK_N)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    r = tl.arange(0, DR)
    q_row = qn_ptr + row * stride_qn_r
    q0 = _q_chunk_t(q_row, offs_h, mask_h, stride_qn_h, 0, GROUP)
    q1 = _q_chunk_t(q_row, offs_h, mask_h, stride_qn_h, 1, GROUP)
    q2 = _q_chunk_t(q_row, offs_h, mask_h, stride_qn_h, 2, GROUP)
    q3 = _q_chunk_t(q_row, offs_h, mask_h, stride_qn_h, 3, GROUP)
    qp = tl.load(qp_ptr + row * stride_qp_r + offs_h[None, :] * stride_qp_h + r[:, None], mask=mask_h[None, :],
                 other=0.0)  # [64, BLOCK_H]
    # float16 q times a power of two per head (max |q| in [2^14, 2^15)), undone in the logit scale.
    qa = tl.maximum(tl.maximum(tl.abs(q0), tl.abs(q1)), tl.maximum(tl.abs(q2), tl.abs(q3)))
    qmax = tl.max(qa.to(tl.float32), axis=0)
    if KV_FMT == format_codes.FP8_TENSOR:  # the rope part is fp8 too and shares q's multiplier
        qmax = tl.maximum(qmax, tl.max(tl.abs(qp).to(tl.float32), axis=0))
    q_mul, q_inv = pow2_scale(qmax, 14)
    q0 = (q0.to(tl.float32) * q_mul[None, :]).to(tl.float16)
    q1 = (q1.to(tl.float32) * q_mul[None, :]).to(tl.float16)
    q2 = (q2.to(tl.float32) * q_mul[None, :]).to(tl.float16)
    q3 = (q3.to(tl.float32) * q_mul[None, :]).to(tl.float16)
    s_scale = tl.full([BLOCK_H], 1.0, tl.float32) * qk_scale
    if KV_FMT == format_codes.FP8_TENSOR:
        qp = (qp.to(tl.float32) * q_mul[None, :]).to(tl.float16)
        s_scale = s_scale * q_inv * tl.load(kv_scale_ptr)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)  # softmax denominator, reduced over tokens after the loop
    a0 = tl.zeros([GROUP, BLOCK_H], tl.float32)
    a1 = tl.zeros([GROUP, BLOCK_H], tl.float32)
    a2 = tl.zeros([GROUP, BLOCK_H], tl.float32)
    a3 = tl.zeros([GROUP, BLOCK_H], tl.float32)
    r0 = tl.full([], 1.0, tl.float32)  # fp8_ds: the power of two each accumulator is held in
    r1 = tl.full([], 1.0, tl.float32)
    r2 = tl.full([], 1.0, tl.float32)
    r3 = tl.full([], 1.0, tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        slot, mask_n = tile_slots(bt_row, n0, end, PAGE_SIZE, BLOCK_N)
        k0 = _chunk_f16(val_ptr, slot, mask_n, 0, VAL_W, GROUP)
        k1 = _chunk_f16(val_ptr, slot, mask_n, 1, VAL_W, GROUP)
        k2 = _chunk_f16(val_ptr, slot, mask_n, 2, VAL_W, GROUP)
        k3 = _chunk_f16(val_ptr, slot, mask_n, 3, VAL_W, GROUP)
        kp = tl.load(pe_ptr + slot[:, None] * PE_W + PE_OFF + r[None, :], mask=mask_n[:, None], other=0.0)
        if KV_FMT == format_codes.FP8_DS:
            ks0 = tl.load(sc_ptr + slot * SC_W + SC_OFF, mask=mask_n, other=0.0)
            ks1 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 1, mask=mask_n, other=0.0)
            ks2 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 2, mask=mask_n, other=0.0)
            ks3 = tl.load(sc_ptr + slot * SC_W + SC_OFF + 3, mask=mask_n, other=0.0)
            s01 = tl.dot(k0, q0) * ks0[:, None] + tl.dot(k1, q1) * ks1[:, None]
            s = s01 + (tl.dot(k2, q2) * ks2[:, None] + tl.dot(k3, q3) * ks3[:, None])
            s = s * q_inv[None, :] + tl.dot(kp, qp)  # rope part: bf16 x bf16
        else:
            s = tl.dot(k0, q0)
            s = tl.dot(k1, q1, s)
            s = tl.dot(k2, q2, s)
            s = tl.dot(k3, q3, s)
            s = tl.dot(kp.to(tl.float16), qp, s)
        s = tl.where(mask_n[:, None], s * s_scale[None, :], float("-inf"))  # [BLOCK_N, BLOCK_H]
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_acc = l_acc * alpha[None, :] + p
        m_i = m_new
        if KV_FMT == format_codes.FP8_DS:
            a0, r0 = _pv_ds(p, alpha, k0, ks0, a0, r0)
            a1, r1 = _pv_ds(p, alpha, k1, ks1, a1, r1)
            a2, r2 = _pv_ds(p, alpha, k2, ks2, a2, r2)
            a3, r3 = _pv_ds(p, alpha, k3, ks3, a3, r3)
        else:  # P times 2^15 (undone in the output scale) keeps small weights out of float16 subnormals
            pb = (p * 32768.0).to(tl.float16)
            a0 = tl.dot(tl.trans(k0), pb, a0 * alpha[None, :])
            a1 = tl.dot(tl.trans(k1), pb, a1 * alpha[None, :])
            a2 = tl.dot(tl.trans(k2), pb, a2 * alpha[None, :])
            a3 = tl.dot(tl.trans(k3), pb, a3 * alpha[None, :])

    l_i = tl.sum(l_acc, axis=0)
    has = l_i > 0.0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    if KV_FMT == format_codes.FP8_TENSOR:
        inv = inv * (tl.load(kv_scale_ptr) * (1.0 / 32768.0))
    if SPLIT:
        o_base = o_ptr + row * stride_o_r + hb * BLOCK_H * stride_o_h + split * stride_o_s
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * stride_lse_r + offs_h * stride_lse_h + split, lse, mask=mask_h)
    else:
        o_base = o_ptr + row * stride_o_r + hb * BLOCK_H * stride_o_h
    _store_t(o_base, a0, inv / r0, mask_h, stride_o_h, 0, GROUP)
    _store_t(o_base, a1, inv / r1, mask_h, stride_o_h, 1, GROUP)
    _store_t(o_base, a2, inv / r2, mask_h, stride_o_h, 2, GROUP)
    _store_t(o_base, a3, inv / r3, mask_h, stride_o_h, 3, GROUP)
