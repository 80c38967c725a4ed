"""DeepSeek MoE routing (the reference the runner uses; matches DeepSeek-V3 `Gate.forward` and transformers).

    noaux_tc (V3, R1, Kimi-K2): s = sigmoid(logits); choice = s + e_score_correction_bias;
        groups ranked by the sum of their top-2 choice scores, the best topk_group kept;
        top-k experts by choice among kept groups; weights = s at those experts.
    sqrtsoftplus (V4): s = sqrt(softplus(logits)); then as noaux_tc with one group; its hash layers pass
        the expert ids (tid2eid[token]) and only weight them.
    greedy (V2-Lite): s = softmax(logits); top-k by s.
    group_limited_greedy (V2): s = softmax(logits); groups ranked by their max s, best topk_group kept.
    Then, if norm_topk_prob: weights /= sum(weights) (+1e-20); finally weights *= routed_scaling_factor.
Ties between equal scores go to the lower expert id (torch.topk on CPU and CUDA).
"""

from __future__ import annotations

import torch

_SCORES = {"sigmoid": torch.sigmoid, "softmax": lambda x: x.softmax(dim=-1),
           "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt()}  # fmt: skip


def route(
    logits: torch.Tensor, bias: torch.Tensor | None, args, ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [T, E] -> (weights float32 [T, k], expert ids int64 [T, k]); ids given: hash routing."""
    t, e = logits.shape
    scores = _SCORES[args.score_func](logits)
    if ids is not None:
        return _weigh(scores, ids, args)
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
    return _weigh(scores, choice.topk(args.n_activated_experts, dim=-1)[1], args)


def _weigh(scores: torch.Tensor, ids: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    weights = scores.gather(1, ids)
    if args.norm_topk_prob and args.n_activated_experts > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * args.route_scale, ids
