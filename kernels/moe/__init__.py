"""Fused MoE for DeepSeek-family models: routing, token/expert alignment, grouped expert MLPs (bf16/fp8/int8/fp4).

Typical use on CUDA (the `_ref` twins take the same arguments and run anywhere):

    logits = router_logits(hidden, gate_weight)                       # [T, E] float32, torch GEMM
    w, ids = deepseek_route(logits, bias, n_group=8, topk_group=4, top_k=8,
                            routed_scaling_factor=2.5, norm_topk_prob=True)
    out = fused_moe(hidden, w13, w2, w, ids, fmt="fp8", w13_scale=s13, w2_scale=s2,
                    shared=ExpertWeights(sw13, sw2, "fp8", ss13, ss2))  # [T, H] bf16

Shapes, dtypes and the arithmetic of every step: reference.py.
"""

from dsquant.kernels.moe.reference import (
    ExpertWeights,
    deepseek_route_ref,
    fused_moe_ref,
    moe_align_ref,
    router_logits,
    stack_experts,
)
from dsquant.kernels.moe.triton import deepseek_route, fused_moe, moe_align

__all__ = [
    "ExpertWeights", "router_logits", "stack_experts",
    "deepseek_route", "deepseek_route_ref",
    "moe_align", "moe_align_ref",
    "fused_moe", "fused_moe_ref",
]
