"""MLA decode over an fp8 / fp8_ds latent cache in Gluon (Hopper), warp-specialized: token_major.py's tile and
arithmetic with the E4M3 -> float16 conversion beside the MMAs instead of between them.

Tokens are the wgmma rows (S^T = K . Q^T, O^T = V^T . P^T), heads its 16 columns, float16 MMAs on the exact
float16 image of the E4M3 codes (token_major.mla_attend_tokens_kernel is the interpreter twin). Two partitions
share two float16 tile buffers, with a ready and a free mbarrier per buffer:
- the converter (CONVERT_WARPS warps) loads the next tile's cache words (32-bit, four codes each) into
  registers while it converts the current one, each word once (two cvt.rn.f16x2.e4m3x2), into a free buffer;
  a word's two float16 pairs go to two shared halves of the chunk (codes 4j, 4j+1 and 4j+2, 4j+3 at columns
  2j, 2j+1), so a thread stores whole words;
- the MMA warpgroup (the default partition) runs Q.K^T with the buffer as the A operand, the online softmax,
  and P.V through a transposed view of the same buffer (16-bit wgmma takes an M-major A from shared memory),
  then frees the buffer. q is loaded in the halves' column order and the output stored back in latent order
  (_dims). Only the float32 summation order differs from the Triton kernels.
The MMA warpgroup holds the output accumulators and the converter the words in flight, so neither spills (one
warpgroup doing both spilled, and its conversion stalled the MMAs). Decode only (one query row per sequence);
the split-KV partial outputs and the merge are triton.py's.

Gluon is compiled only for the GPU (no interpreter); this module imports anywhere.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
from dsquant.kernels import format_codes
from dsquant.kernels.mla.cache import DS_ROPE_OFFSET, DS_SCALE_OFFSET, KV_LORA_RANK, kv_cache_bytes_per_token

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _IMPORT_ERROR = None
except ImportError as e:  # a Triton without Gluon, or with its Hopper names elsewhere
    gluon = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

BLOCK_N = 64  # tokens per tile: one wgmma's rows
BLOCK_H = 16  # heads: the wgmma's columns
NUM_WARPS = 4  # the MMA warpgroup (the converter's warps come on top)


@functools.cache
def gluon_missing() -> str | None:
    """Why this Triton cannot build the kernel (one line), or None when it can."""
    if _IMPORT_ERROR is not None:
        return f"triton {triton.__version__} lacks the Gluon Hopper API ({_IMPORT_ERROR})"
    want = {
        "warpgroup_mma": (warpgroup_mma, ["a", "b", "acc", "use_acc", "is_async"]),
        "warpgroup_mma_wait": (warpgroup_mma_wait, ["num_outstanding", "deps"]),
        "gl.allocate_shared_memory": (gl.allocate_shared_memory, ["element_ty", "shape", "layout"]),
        "gl.warp_specialize": (gl.warp_specialize, ["functions_and_args", "worker_num_warps", "worker_num_regs"]),
        "mbarrier.arrive": (mbarrier.arrive, ["mbarrier", "count"]),
    }
    for name, (fn, params) in want.items():
        have = list(inspect.signature(fn).parameters)
        if any(p not in have for p in params):
            return f"triton {triton.__version__}: {name}{tuple(have)} lacks {params} (written for Triton 3.6)"
    # Later Gluon renamed these (barrier, reinterpret); until the kernel is ported the portable one runs there.
    for name, owner, attr in (("gl.thread_barrier", gl, "thread_barrier"),
                              ("shared_memory_descriptor._reinterpret", gl.shared_memory_descriptor, "_reinterpret")):
        if not hasattr(owner, attr):
            return f"triton {triton.__version__} has no {name} (written for Triton 3.6)"
    return None


def gluon_runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: a Hopper GPU, outside the interpreter, with the Gluon API."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and gluon_missing() is None


def _jit(fn):
    """gluon.jit where Gluon exists; elsewhere the plain function, which is never launched."""
    return gluon.jit(fn) if gluon is not None else fn


@_jit
def _pow2(x, TOP: gl.constexpr):
    """tiles.pow2_scale in Gluon: (2^(TOP - e), 2^(e - TOP)) for x in [2^e, 2^(e+1)), e clamped to +-100."""
    e = ((x.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = gl.minimum(gl.maximum(e, -100), 100)
    mul = (((127 + TOP) - e) << 23).to(gl.float32, bitcast=True)
    return mul, (((127 - TOP) + e) << 23).to(gl.float32, bitcast=True)


@_jit
def _slots(bt_row, n0, end, PAGE_SIZE: gl.constexpr, N: gl.constexpr, layout: gl.constexpr):
    """Flat cache slots and validity of tokens n0 .. n0 + N in `layout` (a 1-D slice layout)."""
    offs = n0 + gl.arange(0, N, layout=layout)
    ok = offs < end
    page = gl.load(bt_row + offs // PAGE_SIZE, mask=ok, other=0).to(gl.int64)
    return page * PAGE_SIZE + offs % PAGE_SIZE, ok


@_jit
def _e4m3_words_to_f16(w):
    """Four E4M3 codes per word -> (f16x2 of codes 0, 1; f16x2 of codes 2, 3), exact, as 32-bit words."""
    return gl.inline_asm_elementwise(
        "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }",
        "=r,=r,r", [w], dtype=(gl.int32, gl.int32), is_pure=True, pack=1)


@_jit
def _store_codes(w, lo_s, hi_s):
    """A chunk's words as float16 into two shared halves: lo_s takes codes 4j, 4j+1 of word j (float16
    columns 2j, 2j+1), hi_s codes 4j+2, 4j+3; _dims gives the latent index of each half's column."""
    lo, hi = _e4m3_words_to_f16(w)
    lo_s.store(lo)
    hi_s.store(hi)


@_jit
def _dims(HALF: gl.constexpr, N: gl.constexpr, layout: gl.constexpr):
    """Latent offset (within its 4*N-wide span) of float16 column i of half HALF (_store_codes's order)."""
    i = gl.arange(0, N, layout=layout)
    return 4 * (i // 2) + 2 * HALF + i % 2


@_jit
def _q_half(q_row, offs_h, mask_h, stride_h, BASE: gl.constexpr, HALF: gl.constexpr, N: gl.constexpr,
            QL: gl.constexpr):
    """q[:, BASE + _dims(HALF)], [BLOCK_H, N] bf16: q in the column order of one shared key half."""
    d = BASE + _dims(HALF, N, gl.SliceLayout(0, QL))
    return gl.load(q_row + offs_h[:, None] * stride_h + d[None, :], mask=mask_h[:, None], other=0.0)


@_jit
def _p_ds(p, ks, p_buf):
    """fp8_ds: P times the token's group scale, in float16 times a power of two per tile, into shared memory;
    returns the multiplier (tiles.pv_scaled's rule)."""
    mul, _ = _pow2(gl.max(ks, axis=0), 14)
    p_buf.store((p * (ks * mul)[:, None]).to(gl.float16))
    return mul


@_jit
def _store_out(o_base, acc, scale, offs_h, mask_h, stride_o_h, BASE: gl.constexpr, HALF: gl.constexpr,
               OL: gl.constexpr):
    """acc [64, BLOCK_H] (MMA layout; rows in _store_codes's order) * scale[head] into out[head, BASE + ...]."""
    o = gl.convert_layout(acc * scale[None, :], OL)
    d = BASE + _dims(HALF, acc.shape[0], gl.SliceLayout(1, OL))
    h = gl.convert_layout(offs_h, gl.SliceLayout(0, OL))
    m = gl.convert_layout(mask_h, gl.SliceLayout(0, OL))
    gl.store(o_base + h[None, :] * stride_o_h + d[:, None], o.to(o_base.dtype.element_ty), mask=m[None, :])


@_jit
def _scale_q(q, q_mul):
    return (q.to(gl.float32) * q_mul[:, None]).to(gl.float16)


@_jit
def _qk(k_s, q_s, kp_s, qp_s, s_zero, DS: gl.constexpr, KB=0, PB=0):
    """Issue a tile's Q.K^T wgmmas (S^T = K . Q^T, [BLOCK_N, BLOCK_H]) on the key halves k_s[KB:KB + 8] and the
    rope tiles kp_s[PB:]: fp8 one accumulator over the eight key halves and the rope part; fp8_ds one per
    128-value group (each scaled by its own token scale)."""
    if DS:
        c0 = warpgroup_mma(k_s.index(KB), q_s.index(0).permute((1, 0)), s_zero, is_async=True)
        c0 = warpgroup_mma(k_s.index(KB + 1), q_s.index(1).permute((1, 0)), c0, is_async=True)
        c1 = warpgroup_mma(k_s.index(KB + 2), q_s.index(2).permute((1, 0)), s_zero, is_async=True)
        c1 = warpgroup_mma(k_s.index(KB + 3), q_s.index(3).permute((1, 0)), c1, is_async=True)
        c2 = warpgroup_mma(k_s.index(KB + 4), q_s.index(4).permute((1, 0)), s_zero, is_async=True)
        c2 = warpgroup_mma(k_s.index(KB + 5), q_s.index(5).permute((1, 0)), c2, is_async=True)
        c3 = warpgroup_mma(k_s.index(KB + 6), q_s.index(6).permute((1, 0)), s_zero, is_async=True)
        c3 = warpgroup_mma(k_s.index(KB + 7), q_s.index(7).permute((1, 0)), c3, is_async=True)
        cr = warpgroup_mma(kp_s.index(PB), qp_s.index(0).permute((1, 0)), s_zero, is_async=True)
        return c0, c1, c2, c3, cr
    else:
        s = warpgroup_mma(k_s.index(KB), q_s.index(0).permute((1, 0)), s_zero, is_async=True)
        for i in gl.static_range(1, 8):
            s = warpgroup_mma(k_s.index(KB + i), q_s.index(i).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(kp_s.index(PB), qp_s.index(0).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(kp_s.index(PB + 1), qp_s.index(1).permute((1, 0)), s, is_async=True)
        return s, s, s, s, s


CONVERT_WARPS = 8
# Registers a thread: the launch's 12 warps x MAX_REGS fit the 64K register file; setmaxnreg then moves the
# converter's share to the MMA warpgroup, which holds the output accumulators.
MAX_REGS, CONVERT_REGS = 168, 128


@_jit
def _load_words(w_ptr, slot, ok, W: gl.constexpr, OFF: gl.constexpr, N_W: gl.constexpr, L: gl.constexpr):
    c = gl.arange(0, N_W, layout=gl.SliceLayout(0, L))
    return gl.load(w_ptr + slot[:, None] * W + OFF + c[None, :], mask=ok[:, None], other=0)


@_jit
def _load_tile(w_ptr, bt_row, n0, end, PAGE_SIZE: gl.constexpr, W: gl.constexpr, PE_OFF: gl.constexpr,
               N: gl.constexpr, PE_WORDS: gl.constexpr, LD: gl.constexpr, LDR: gl.constexpr):
    """One tile's words in registers: four [N, 32] chunks (128 codes each) and the rope part's [N, PE_WORDS];
    masked tokens read 0, so NaN in unused slots never reaches P.V."""
    slot, ok = _slots(bt_row, n0, end, PAGE_SIZE, N, gl.SliceLayout(1, LD))
    k0 = _load_words(w_ptr, slot, ok, W, 0, 32, LD)
    k1 = _load_words(w_ptr, slot, ok, W, 32, 32, LD)
    k2 = _load_words(w_ptr, slot, ok, W, 64, 32, LD)
    k3 = _load_words(w_ptr, slot, ok, W, 96, 32, LD)
    slot_r, ok_r = _slots(bt_row, n0, end, PAGE_SIZE, N, gl.SliceLayout(1, LDR))
    kp = _load_words(w_ptr, slot_r, ok_r, W, PE_OFF, PE_WORDS, LDR)
    return k0, k1, k2, k3, kp


@_jit
def _convert_partition(w_ptr, bt_row, start, end, k_w, kp_w, ready, free,
                       PAGE_SIZE: gl.constexpr, W: gl.constexpr, PE_OFF: gl.constexpr, DS: gl.constexpr,
                       BLOCK_N: gl.constexpr, WARPS: gl.constexpr):
    PE_WORDS: gl.constexpr = 32 if DS else 16
    # 16 bytes a thread, 8 threads per 128-byte token row
    LD: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    LDR: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (PE_WORDS // 4), PE_WORDS // 4], [WARPS, 1], [1, 0])
    k0, k1, k2, k3, kp = _load_tile(w_ptr, bt_row, start, end, PAGE_SIZE, W, PE_OFF, BLOCK_N, PE_WORDS, LD, LDR)
    for it in range(gl.cdiv(end - start, BLOCK_N)):
        b = it % 2
        # The next tile's loads go out before this one waits for its buffer.
        n0, n1, n2, n3, npe = _load_tile(w_ptr, bt_row, start + (it + 1) * BLOCK_N, end, PAGE_SIZE, W, PE_OFF,
                                         BLOCK_N, PE_WORDS, LD, LDR)
        mbarrier.wait(free.index(b), ((it // 2) & 1) ^ 1)  # a fresh barrier passes the first lap
        _store_codes(k0, k_w.index(8 * b), k_w.index(8 * b + 1))
        _store_codes(k1, k_w.index(8 * b + 2), k_w.index(8 * b + 3))
        _store_codes(k2, k_w.index(8 * b + 4), k_w.index(8 * b + 5))
        _store_codes(k3, k_w.index(8 * b + 6), k_w.index(8 * b + 7))
        if DS:
            kp_w.index(b).store(kp)
        else:
            _store_codes(kp, kp_w.index(2 * b), kp_w.index(2 * b + 1))
        fence_async_shared()
        gl.thread_barrier()  # every converter thread's stores precede the arrive
        mbarrier.arrive(ready.index(b), count=1)
        k0, k1, k2, k3, kp = n0, n1, n2, n3, npe


@_jit
def _mma_partition(k_s, kp_s, q_s, qp_s, p_s, ready, free, sc_ptr, bt_row, start, end, q_inv, s_scale,
                   o_base, lse_ptr_row, stride_o_h, stride_lse_h, hb, num_heads, kv_scale_ptr,
                   PAGE_SIZE: gl.constexpr, W: gl.constexpr, SC_OFF: gl.constexpr, DS: gl.constexpr,
                   SPLIT: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_H, 16])
    OL: gl.constexpr = gl.BlockedLayout([2, 1], [32, 1], [1, 4], [0, 1])
    ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
    COLS: gl.constexpr = gl.SliceLayout(0, MMA)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=COLS)
    l_acc = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=MMA)
    s_zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=MMA)
    a0 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a1 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a2 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a3 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a4 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a5 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a6 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    a7 = gl.zeros([64, BLOCK_H], gl.float32, layout=MMA)
    r0 = gl.full([BLOCK_H], 1.0, gl.float32, layout=COLS)
    r1 = gl.full([BLOCK_H], 1.0, gl.float32, layout=COLS)
    r2 = gl.full([BLOCK_H], 1.0, gl.float32, layout=COLS)
    r3 = gl.full([BLOCK_H], 1.0, gl.float32, layout=COLS)
    q_inv = gl.convert_layout(q_inv, COLS)
    s_scale = gl.convert_layout(s_scale, COLS)
    for it in range(gl.cdiv(end - start, BLOCK_N)):
        b = it % 2
        n0 = start + it * BLOCK_N
        kb = 8 * b
        mbarrier.wait(ready.index(b), (it // 2) & 1)
        slot, ok = _slots(bt_row, n0, end, PAGE_SIZE, BLOCK_N, ROWS)
        c0, c1, c2, c3, cr = _qk(k_s, q_s, kp_s, qp_s, s_zero, DS, kb, (1 if DS else 2) * b)
        if DS:
            sc = sc_ptr + slot * W + SC_OFF
            ks0 = gl.load(sc, mask=ok, other=0.0)
            ks1 = gl.load(sc + 1, mask=ok, other=0.0)
            ks2 = gl.load(sc + 2, mask=ok, other=0.0)
            ks3 = gl.load(sc + 3, mask=ok, other=0.0)
            c0, c1, c2, c3, cr = warpgroup_mma_wait(0, deps=[c0, c1, c2, c3, cr])
            s = (c0 * ks0[:, None] + c1 * ks1[:, None]) + (c2 * ks2[:, None] + c3 * ks3[:, None])
            s = s * q_inv[None, :] + cr
        else:
            s = warpgroup_mma_wait(0, deps=[c0])
        s = gl.where(ok[:, None], s * s_scale[None, :], float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        l_acc = l_acc * alpha[None, :] + p
        m_i = m_new
        if DS:
            u0 = _p_ds(p, ks0, p_s.index(0))
            u1 = _p_ds(p, ks1, p_s.index(1))
            u2 = _p_ds(p, ks2, p_s.index(2))
            u3 = _p_ds(p, ks3, p_s.index(3))
            f0, f1, f2, f3 = alpha * (u0 / r0), alpha * (u1 / r1), alpha * (u2 / r2), alpha * (u3 / r3)
            r0, r1, r2, r3 = r0 * 0.0 + u0, r1 * 0.0 + u1, r2 * 0.0 + u2, r3 * 0.0 + u3
            fence_async_shared()
            gl.thread_barrier()
            P0, P1, P2, P3 = p_s.index(0), p_s.index(1), p_s.index(2), p_s.index(3)
        else:  # P times 2^15 (undone in the output scale) keeps small weights out of float16 subnormals
            p_s.index(0).store((p * 32768.0).to(gl.float16))
            f0, f1, f2, f3 = alpha, alpha, alpha, alpha
            fence_async_shared()
            gl.thread_barrier()
            P0, P1, P2, P3 = p_s.index(0), p_s.index(0), p_s.index(0), p_s.index(0)
        a0 = warpgroup_mma(k_s.index(kb + 0).permute((1, 0)), P0, a0 * f0[None, :], is_async=True)
        a1 = warpgroup_mma(k_s.index(kb + 1).permute((1, 0)), P0, a1 * f0[None, :], is_async=True)
        a2 = warpgroup_mma(k_s.index(kb + 2).permute((1, 0)), P1, a2 * f1[None, :], is_async=True)
        a3 = warpgroup_mma(k_s.index(kb + 3).permute((1, 0)), P1, a3 * f1[None, :], is_async=True)
        a4 = warpgroup_mma(k_s.index(kb + 4).permute((1, 0)), P2, a4 * f2[None, :], is_async=True)
        a5 = warpgroup_mma(k_s.index(kb + 5).permute((1, 0)), P2, a5 * f2[None, :], is_async=True)
        a6 = warpgroup_mma(k_s.index(kb + 6).permute((1, 0)), P3, a6 * f3[None, :], is_async=True)
        a7 = warpgroup_mma(k_s.index(kb + 7).permute((1, 0)), P3, a7 * f3[None, :], is_async=True)
        a0, a1, a2, a3, a4, a5, a6, a7 = warpgroup_mma_wait(0, deps=[a0, a1, a2, a3, a4, a5, a6, a7])
        gl.thread_barrier()  # every warp's MMAs are done with the buffer and p_s
        mbarrier.arrive(free.index(b), count=1)

    l_i = gl.sum(l_acc, axis=0)
    has = l_i > 0.0
    inv = 1.0 / gl.where(has, l_i, 1.0)
    if not DS:
        inv = inv * (gl.load(kv_scale_ptr) * (1.0 / 32768.0))
    offs_h = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=COLS)
    mask_h = offs_h < num_heads
    if SPLIT:
        lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
        gl.store(lse_ptr_row + offs_h * stride_lse_h, lse, mask=mask_h)
    _store_out(o_base, a0, inv / r0, offs_h, mask_h, stride_o_h, 0, 0, OL)
    _store_out(o_base, a1, inv / r0, offs_h, mask_h, stride_o_h, 0, 1, OL)
    _store_out(o_base, a2, inv / r1, offs_h, mask_h, stride_o_h, 128, 0, OL)
    _store_out(o_base, a3, inv / r1, offs_h, mask_h, stride_o_h, 128, 1, OL)
    _store_out(o_base, a4, inv / r2, offs_h, mask_h, stride_o_h, 256, 0, OL)
    _store_out(o_base, a5, inv / r2, offs_h, mask_h, stride_o_h, 256, 1, OL)
    _store_out(o_base, a6, inv / r3, offs_h, mask_h, stride_o_h, 384, 0, OL)
    _store_out(o_base, a7, inv / r3, offs_h, mask_h, stride_o_h, 384, 1, OL)


@_jit
def mla_decode_gluon_kernel(
    qn_ptr, qp_ptr,  # [B, H, 512], [B, H, 64] bf16
    w_ptr, sc_ptr, kv_scale_ptr,  # the cache as int32 words, its float32 view (fp8_ds scales), float32 [] (fp8)
    bt_ptr, row_len_ptr,  # [B, max_pages] int32, [B] int32
    o_ptr, lse_ptr,  # SPLIT: float32 [B, H, S, 512] and [B, H, S]; else [B, H, 512] output
    qk_scale, num_heads, num_splits,
    stride_qn_r, stride_qn_h, stride_qp_r, stride_qp_h, stride_bt,
    stride_o_r, stride_o_h, stride_o_s, stride_lse_r, stride_lse_h,
    PAGE_SIZE: gl.constexpr, KV_FMT: gl.constexpr, SPLIT: gl.constexpr,
    W: gl.constexpr, SC_OFF: gl.constexpr, PE_OFF: gl.constexpr,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, CONVERT_WARPS: gl.constexpr, CONVERT_REGS: gl.constexpr,
):
    DS: gl.constexpr = KV_FMT == format_codes.FP8_DS
    QL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    SW16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SW32: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    PE_SWZ: gl.constexpr = 128 if DS else 64
    PE16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=PE_SWZ, element_bitwidth=16, rank=2)
    PE32: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=PE_SWZ, element_bitwidth=32, rank=2)
    ROPE_T: gl.constexpr = gl.bfloat16 if DS else gl.float16
    PE_N: gl.constexpr = 64 if DS else 32
    NPE: gl.constexpr = 1 if DS else 2
    P_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], gl.float16)

    row = gl.program_id(1).to(gl.int64)
    split = gl.program_id(2)
    hb = gl.program_id(0)
    kv_len = gl.load(row_len_ptr + row)
    per_split = gl.cdiv(gl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = gl.minimum(start + per_split, kv_len)
    bt_row = bt_ptr + row * stride_bt

    # Two float16 tile buffers, key halves [8 b, 8 b + 8) of k_s and rope tiles [NPE b, NPE b + NPE) of kp_s for
    # buffer b; the converter writes them as 32-bit words (gluon_decode._store_codes's column order).
    k_s = gl.allocate_shared_memory(gl.float16, [16, BLOCK_N, 64], SW16)
    k_w = k_s._reinterpret(gl.int32, [16, BLOCK_N, 32], SW32)
    kp_s = gl.allocate_shared_memory(ROPE_T, [2 * NPE, BLOCK_N, PE_N], PE16)
    kp_w = kp_s._reinterpret(gl.int32, [2 * NPE, BLOCK_N, PE_N // 2], PE32)
    q_s = gl.allocate_shared_memory(gl.float16, [8, BLOCK_H, 64], SW16)
    qp_s = gl.allocate_shared_memory(ROPE_T, [NPE, BLOCK_H, PE_N], PE16)
    p_s = gl.allocate_shared_memory(gl.float16, [4 if DS else 1, BLOCK_N, BLOCK_H], P_SL)
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=1)

    # q: float16 times a power of two per head (gluon_decode's rule), in the column order of the key halves.
    offs_hq = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, QL))
    mask_hq = offs_hq < num_heads
    q_row = qn_ptr + row * stride_qn_r
    qa = gl.zeros([BLOCK_H, 64], gl.float32, layout=QL)
    for i in gl.static_range(8):
        qa = gl.maximum(qa, gl.abs(_q_half(q_row, offs_hq, mask_hq, stride_qn_h, 128 * (i // 2), i % 2, 64,
                                           QL).to(gl.float32)))
    qp_row = qp_ptr + row * stride_qp_r
    if DS:
        rq = gl.arange(0, 64, layout=gl.SliceLayout(0, QL))
        qp_s.index(0).store(gl.load(qp_row + offs_hq[:, None] * stride_qp_h + rq[None, :], mask=mask_hq[:, None],
                                    other=0.0))
        qmax = gl.max(qa, axis=1)
    else:
        qp0 = _q_half(qp_row, offs_hq, mask_hq, stride_qp_h, 0, 0, 32, QL)
        qp1 = _q_half(qp_row, offs_hq, mask_hq, stride_qp_h, 0, 1, 32, QL)
        qpa = gl.maximum(gl.abs(qp0), gl.abs(qp1)).to(gl.float32)
        qmax = gl.maximum(gl.max(qa, axis=1), gl.max(qpa, axis=1))
    q_mul, q_inv = _pow2(qmax, 14)
    for i in gl.static_range(8):
        q_s.index(i).store(_scale_q(_q_half(q_row, offs_hq, mask_hq, stride_qn_h, 128 * (i // 2), i % 2, 64, QL),
                                    q_mul))
    if not DS:
        qp_s.index(0).store(_scale_q(qp0, q_mul))
        qp_s.index(1).store(_scale_q(qp1, q_mul))
    s_scale = gl.full([BLOCK_H], 1.0, gl.float32, layout=gl.SliceLayout(1, QL)) * qk_scale
    if not DS:
        s_scale = s_scale * q_inv * gl.load(kv_scale_ptr)
    fence_async_shared()
    gl.thread_barrier()

    if SPLIT:
        o_base = o_ptr + row * stride_o_r + split * stride_o_s
        lse_row = lse_ptr + row * stride_lse_r + split
    else:
        o_base = o_ptr + row * stride_o_r
        lse_row = lse_ptr
    gl.warp_specialize([
        (_mma_partition, (k_s, kp_s, q_s, qp_s, p_s, ready, free, sc_ptr, bt_row, start, end, q_inv, s_scale,
                          o_base, lse_row, stride_o_h, stride_lse_h, hb, num_heads, kv_scale_ptr,
                          PAGE_SIZE, W, SC_OFF, DS, SPLIT, BLOCK_H, BLOCK_N)),
        (_convert_partition, (w_ptr, bt_row, start, end, k_w, kp_w, ready, free, PAGE_SIZE, W, PE_OFF, DS,
                              BLOCK_N, CONVERT_WARPS)),
    ], [CONVERT_WARPS], [CONVERT_REGS])


def _constants(kind: str, page_size: int, split: bool) -> dict:
    """The kernel's constexpr arguments for a cache of `kind` with pages of `page_size` tokens (32-bit words)."""
    return dict(PAGE_SIZE=page_size, KV_FMT=format_codes.KV_CACHE_FORMATS[kind], SPLIT=split,
                W=kv_cache_bytes_per_token(kind) // 4, SC_OFF=DS_SCALE_OFFSET // 4,
                PE_OFF=(DS_ROPE_OFFSET if kind == "fp8_ds" else KV_LORA_RANK) // 4, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
                CONVERT_WARPS=CONVERT_WARPS, CONVERT_REGS=CONVERT_REGS)


def launch_decode(q_nope, q_pe, kv_cache, kind, block_table, row_len, qk_scale, kv_scale, num_splits, o, lse,
                  so, slse, heads):
    """Launch the kernel over one decode batch (triton._attend checked the arguments and sized o / lse)."""
    words = kv_cache.view(torch.int32)
    mla_decode_gluon_kernel[(triton.cdiv(heads, BLOCK_H), q_nope.shape[0], num_splits)](
        q_nope, q_pe, words, words.view(torch.float32), kv_scale if kind == "fp8" else words.view(torch.float32),
        block_table, row_len, o, lse, qk_scale, heads, num_splits,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_table.stride(0), *so, *slse,
        **_constants(kind, kv_cache.shape[1], num_splits > 1), num_warps=NUM_WARPS, maxnreg=MAX_REGS,
    )


def compile_sm90(kind: str = "fp8", page_size: int = 64):
    """The kernel as a split decode launch builds it, compiled for sm_90a on any machine (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constants = _constants(kind, page_size, True)
    types = dict(qn_ptr="*bf16", qp_ptr="*bf16", w_ptr="*i32", bt_ptr="*i32", row_len_ptr="*i32", qk_scale="fp32")
    params = list(inspect.signature(mla_decode_gluon_kernel.fn).parameters)
    signature = {p: "constexpr" if p in constants else types.get(p, "*fp32" if p.endswith("_ptr") else "i32")
                 for p in params}
    aligned = {(params.index(p),): [["tt.divisibility", 16]] for p in params if p.endswith("_ptr")}  # as torch's
    src = GluonASTSource(mla_decode_gluon_kernel, signature, {(params.index(p),): v for p, v in constants.items()},
                         aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=NUM_WARPS, maxnreg=MAX_REGS))
