"""Top-k / top-p sampling from probabilities in Triton (spec: reference.py, threshold form).

One program per row. Both thresholds are found by bisection on the float32 bit patterns (32 passes
over the row, counting and summing the entries at or above each candidate), so they land exactly on
the reference's values; masses are float64 as in the reference. Then one pass for the kept mass and
one for the inverse-CDF pick in id order. No sort, no host sync: the cost is ~34 reads of the row,
which stays in L2 for one row of a 129280-entry vocabulary (517 KB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _top_k_top_p_sample_kernel(
    probs_ptr, top_k_ptr, top_p_ptr, u_ptr, out_ptr, stride_p,
    V: tl.constexpr,  # the vocabulary: static per model, one compile
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = probs_ptr + row * stride_p
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row).to(tl.float64)
    u = tl.load(u_ptr + row).to(tl.float64)
    offs = tl.arange(0, BLOCK_V)
    zf = tl.sum(tl.zeros([BLOCK_V], tl.float64), axis=0)  # float64 / int32 scalar zeros, loop-carry safe
    zi = tl.sum(tl.zeros([BLOCK_V], tl.int32), axis=0)
    total = zf
    for start in range(0, V, BLOCK_V):
        p = tl.load(base + start + offs, mask=start + offs < V, other=0.0)
        total += tl.sum(p.to(tl.float64), axis=0)
    target = top_p * total
    lo_k = zi
    hi_k = zi + 0x7F800001  # above +inf: nothing is kept there
    lo_p = zi
    hi_p = zi + 0x7F800001
    for _ in range(32):  # the bit range has < 2^31 values: 31 halvings reach width 1
        mid_k = lo_k + (hi_k - lo_k) // 2
        mid_p = lo_p + (hi_p - lo_p) // 2
        cnt = zi
        mass = zf
        for start in range(0, V, BLOCK_V):
            m = start + offs < V
            p = tl.load(base + start + offs, mask=m, other=0.0)
            bits = p.to(tl.int32, bitcast=True)
            cnt += tl.sum(((bits >= mid_k) & m).to(tl.int32), axis=0)
            mass += tl.sum(tl.where((bits >= mid_p) & m, p.to(tl.float64), 0.0), axis=0)
        ok_k = cnt >= k
        lo_k = tl.where(ok_k, mid_k, lo_k)
        hi_k = tl.where(ok_k, hi_k, mid_k)
        ok_p = mass >= target
        lo_p = tl.where(ok_p, mid_p, lo_p)
        hi_p = tl.where(ok_p, hi_p, mid_p)
    theta_k = tl.where((k > 0) & (k < V), lo_k, 0)
    theta_p = tl.where(top_p < 1.0, lo_p, 0)
    theta = tl.maximum(theta_k, theta_p)
    kept_total = zf
    for start in range(0, V, BLOCK_V):
        m = start + offs < V
        p = tl.load(base + start + offs, mask=m, other=0.0)
        keep = (p.to(tl.int32, bitcast=True) >= theta) & m
        kept_total += tl.sum(tl.where(keep, p.to(tl.float64), 0.0), axis=0)
    goal = u * kept_total
    carry = zf
    found = zi + 2147483647
    last = zi - 1
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        m = idx < V
        p = tl.load(base + idx, mask=m, other=0.0)
        keep = (p.to(tl.int32, bitcast=True) >= theta) & m
        pk = tl.where(keep, p.to(tl.float64), 0.0)
        c = carry + tl.cumsum(pk, axis=0)
        found = tl.minimum(found, tl.min(tl.where((c > goal) & keep, idx, 2147483647), axis=0))
        last = tl.maximum(last, tl.max(tl.where(keep, idx, -1), axis=0))
        carry += tl.sum(pk, axis=0)
    tok = tl.where(found < V, found, last)
    tl.store(out_ptr + row, tok.to(tl.int64))


def top_k_top_p_sample(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """probs float32 [B, V] (non-negative), top_k int32 [B], top_p float32 [B], uniform float32 [B] in [0, 1)
    -> token ids int64 [B]."""
    assert probs.dim() == 2 and probs.dtype == torch.float32 and probs.stride(1) == 1, f"probs {probs.dtype}"
    b, v = probs.shape
    assert top_k.shape == (b,) and top_k.dtype == torch.int32, f"top_k {tuple(top_k.shape)} {top_k.dtype}"
    assert top_p.shape == (b,) and top_p.dtype == torch.float32, f"top_p {tuple(top_p.shape)} {top_p.dtype}"
    assert uniform.shape == (b,) and uniform.dtype == torch.float32, f"uniform {tuple(uniform.shape)}"
    out = torch.empty(b, dtype=torch.int64, device=probs.device)
    if b:
        # performance hyper-parameters: 4096 entries per step keeps the row loop short at V = 129280
        block = min(4096, triton.next_power_of_2(v))
        _top_k_top_p_sample_kernel[(b,)](probs, top_k, top_p, uniform, out, probs.stride(0), V=v, BLOCK_V=block,
                                         num_warps=8)  # fmt: skip
    return out
