"""DeepSeek routing in one Triton kernel: scores, group limit, top-k (or hash lookup), renormalise, routed scale.

One program per token holds the token's E scores as a [groups, experts per group] tile, so the group scores are
row reductions and every top-k step is two reductions (max, then the lowest index reaching it). Hash routing
(DeepSeek-V4's first layers) reads the token's row of tid2eid instead of selecting, and weighs those experts. The
router GEMM itself stays in torch (reference.router_logits). Spec: reference.deepseek_route_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsquant.kernels.moe.reference import METHODS, RENORM_EPS, SCORING, SOFTPLUS_THRESHOLD, check_route_args

_GROUP_NONE, _GROUP_TOP2_SUM, _GROUP_MAX = 0, 1, 2


@triton.jit
def _sqrt_softplus(x, THRESHOLD: tl.constexpr):
    """sqrt(softplus(x)), softplus(x) = max(x, 0) + log1p(exp(-|x|)) (x itself above THRESHOLD, as torch). log1p(u)
    is log(1 + u) * u / ((1 + u) - 1), which cancels the rounding of 1 + u (Goldberg), so scores of very negative
    logits keep their relative precision instead of falling to 0 with log(1 + u)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.sqrt_rn(tl.where(x > THRESHOLD, x, tl.maximum(x, 0.0) + log1p))


@triton.jit
def _deepseek_route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, tid2eid_ptr, tokens_ptr,
    stride_lt, stride_tid, routed_scale,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    G_PAD: tl.constexpr, GS_PAD: tl.constexpr, K_PAD: tl.constexpr,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_MODE: tl.constexpr, NORM: tl.constexpr, HASH: tl.constexpr,
    EPS: tl.constexpr, SOFTPLUS_THRESHOLD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)
    j = tl.arange(0, GS_PAD)
    valid = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)
    idx = g[:, None] * GROUP_SIZE + j[None, :]  # [G_PAD, GS_PAD] expert index
    x = tl.load(logits_ptr + t * stride_lt + idx, mask=valid, other=float("-inf")).to(tl.float32)
    if SCORE == 1:  # softmax
        p = tl.where(valid, tl.exp(x - tl.max(tl.max(x, 1), 0)), 0.0)
        s = p / tl.sum(tl.sum(p, 1), 0)
    elif SCORE == 2:  # sqrtsoftplus
        s = _sqrt_softplus(x, SOFTPLUS_THRESHOLD)
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    sel = tl.where(valid, sel, float("-inf"))

    if GROUP_MODE != 0:
        m1 = tl.max(sel, 1)  # [G_PAD]
        if GROUP_MODE == 1:  # sum of the two largest, a repeated maximum counting twice (torch.topk)
            first = tl.min(tl.where(sel == m1[:, None], j[None, :], GS_PAD), 1)
            gscore = m1 + tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), sel), 1)
        else:
            gscore = m1
        gscore = tl.where(g < N_GROUP, gscore, float("-inf"))
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, 0)
            gi = tl.min(tl.where(gscore == best, g, G_PAD), 0)
            keep = keep | (g == gi)
            gscore = tl.where(g == gi, float("-inf"), gscore)
        sel = tl.where(keep[:, None], sel, float("-inf"))

    kk = tl.arange(0, K_PAD)
    out_ids = tl.zeros([K_PAD], dtype=tl.int32)
    out_w = tl.zeros([K_PAD], dtype=tl.float32)
    if HASH:  # the experts are the token's row of tid2eid, in the table's order
        tok = tl.load(tokens_ptr + t).to(tl.int64)
        row = tl.load(tid2eid_ptr + tok * stride_tid + kk, mask=kk < TOP_K, other=0).to(tl.int32)
        for i in tl.static_range(TOP_K):
            bi = tl.sum(tl.where(kk == i, row, 0), 0)
            wi = tl.sum(tl.sum(tl.where(idx == bi, s, 0.0), 1), 0)
            out_ids = tl.where(kk == i, bi, out_ids)
            out_w = tl.where(kk == i, wi, out_w)
    else:
        for i in tl.static_range(TOP_K):
            best = tl.max(tl.max(sel, 1), 0)
            bi = tl.min(tl.min(tl.where(sel == best, idx, N_GROUP * GROUP_SIZE), 1), 0)
            wi = tl.sum(tl.sum(tl.where(idx == bi, s, 0.0), 1), 0)  # the unbiased score
            out_ids = tl.where(kk == i, bi, out_ids)
            out_w = tl.where(kk == i, wi, out_w)
            sel = tl.where(idx == bi, float("-inf"), sel)
    if NORM:
        out_w = out_w / (tl.sum(out_w, 0) + EPS)
    out_w = out_w * routed_scale
    tl.store(w_ptr + t * TOP_K + kk, out_w, mask=kk < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kk, out_ids, mask=kk < TOP_K)


def deepseek_route(
    logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None = None,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    top_k: int = 8,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
    scoring: str = "sigmoid",
    method: str = "noaux_tc",
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek router on precomputed logits, one kernel launch, no host sync (spec: deepseek_route_ref).

    Args:
        logits: [T, E] router logits (float32 preferred: logits = hidden.float() @ gate_w.float().T), last dim
            contiguous. E = 256 (V3, 8 groups, top-4 groups), 384 (Kimi-K2, 1 group), 64/160 (V2-Lite/V2).
        e_score_correction_bias: float32 [E] (noaux_tc), or None.
        n_group, topk_group, top_k, routed_scaling_factor, norm_topk_prob: the checkpoint config values.
        scoring: "sigmoid" (V3), "softmax" (V2) or "sqrtsoftplus" (V4).
        method: "noaux_tc", "group_limited_greedy" or "greedy".
        tid2eid: integer [V, top_k] with token_ids integer [T]: hash routing (V4's first layers), the experts of
            token t are tid2eid[token_ids[t]]; ids are not checked against E here (the reference indexes them).
    Returns:
        (topk_weights float32 [T, top_k], topk_ids int32 [T, top_k]); ties go to the lowest index.
    """
    check_route_args(logits, e_score_correction_bias, n_group, topk_group, top_k, scoring, method, tid2eid,
                     token_ids)
    hashed = tid2eid is not None
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    t, e = logits.shape
    if method == "greedy" or n_group == 1 or hashed:  # hash routing selects nothing: no groups, no bias
        n_group, topk_group, mode = 1, 1, _GROUP_NONE
    else:
        mode = _GROUP_TOP2_SUM if method == METHODS[0] else _GROUP_MAX
    has_bias = method == "noaux_tc" and e_score_correction_bias is not None and not hashed
    bias = e_score_correction_bias.float().contiguous() if has_bias else logits
    if hashed and tid2eid.stride(1) != 1:
        tid2eid = tid2eid.contiguous()
    table, tokens = (tid2eid, token_ids.contiguous()) if hashed else (logits, logits)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    gs = e // n_group
    # performance hyper-parameters: one token per program; a warp covers up to 512 scores.
    num_warps = 1 if e <= 512 else 4
    _deepseek_route_kernel[(t,)](
        logits, bias, weights, ids, table, tokens, logits.stride(0), table.stride(0) if hashed else 0,
        float(routed_scaling_factor),
        N_GROUP=n_group, GROUP_SIZE=gs, TOPK_GROUP=topk_group, TOP_K=top_k,
        G_PAD=triton.next_power_of_2(n_group), GS_PAD=triton.next_power_of_2(gs),
        K_PAD=triton.next_power_of_2(top_k),
        SCORE=SCORING.index(scoring), HAS_BIAS=has_bias, GROUP_MODE=mode, NORM=bool(norm_topk_prob) and top_k > 1,
        HASH=hashed, EPS=RENORM_EPS, SOFTPLUS_THRESHOLD=SOFTPLUS_THRESHOLD, num_warps=num_warps,
    )
    return weights, ids
