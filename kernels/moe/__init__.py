"""Fused MoE for DeepSeek-family models: routing, token/expert alignment, grouped expert MLPs (bf16/fp8/int8/fp4).

Typical use on CUDA (the `_ref` twins take the same arguments and run anywhere):

    ew = stack_experts("fp8", gate, up, down)  # once per layer: per-expert (q, scale, global_scale) -> one stack
    logits = router_logits(hidden, gate_weight)                       # [T, E] float32, torch GEMM
    w, ids = deepseek_route(logits, bias, n_group=8, topk_group=4, top_k=8,
                            routed_scaling_factor=2.5, norm_topk_prob=True)
    out = fused_moe(hidden, ew.w13, ew.w2, w, ids, fmt=ew.fmt, w13_scale=ew.w13_scale, w2_scale=ew.w2_scale,
                    shared=ExpertWeights(sw13, sw2, "fp8", ss13, ss2))  # [T, H] bf16

Shapes, dtypes and the arithmetic of every step: reference.py.
"""

from dsquant.kernels.moe.reference import (
    ExpertWeights,
    deepseek_route_ref,
    fused_moe_ref,
    moe_align_ref,
    quantize_experts,
    router_logits,
    stack_experts,
)
from dsquant.kernels.moe.triton import deepseek_route, fused_moe, moe_align

__all__ = [
    "ExpertWeights", "router_logits", "stack_experts", "quantize_experts",
    "deepseek_route", "deepseek_route_ref",
    "moe_align", "moe_align_ref",
    "fused_moe", "fused_moe_ref",
]
