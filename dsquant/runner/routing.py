"""DeepSeek MoE routing (the reference the runner uses; matches DeepSeek-V3 `Gate.forward` and transformers).

    noaux_tc (V3, R1, Kimi-K2): s = sigmoid(logits); choice = s + e_score_correction_bias;
        groups ranked by the sum of their top-2 choice scores, the best topk_group kept;
        top-k experts by choice among kept groups; weights = s at those experts.
    greedy (V2-Lite): s = softmax(logits); top-k by s.
    group_limited_greedy (V2): s = softmax(logits); groups ranked by their max s, best topk_group kept.
    Then, if norm_topk_prob: weights /= sum(weights) (+1e-20); finally weights *= routed_scaling_factor.
Ties between equal scores go to the lower expert id (torch.topk on CPU and CUDA).
"""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, bias: torch.Tensor | None, args) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [T, E] -> (weights float32 [T, k], expert ids int64 [T, k])."""
    t, e = logits.shape
    scores = logits.sigmoid() if args.score_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None or args.topk_method != "noaux_tc" else scores + bias.float()
    groups = args.n_expert_groups
    if groups > 1 and args.topk_method in ("noaux_tc", "group_limited_greedy"):
        grouped = choice.view(t, groups, e // groups)
        if args.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(args.n_limited_groups, dim=-1)[1]  # [T, topk_group]
        mask = torch.ones(t, groups, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(t, e)
    ids = choice.topk(args.n_activated_experts, dim=-1)[1]
    weights = scores.gather(1, ids)
    if args.norm_topk_prob and args.n_activated_experts > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * args.route_scale, ids
