"""The runner's routed experts on the fused MoE kernel (dsquant.kernels.moe.fused_moe), for V3 and V4 alike.

A layer's experts run there when every one stores its three linears in one format, with the activation scheme the
kernel executes for it (its dsquant.formats.registry entry's fused_moe_act, so the loop's numerics), H and I are
multiples of 128, and, for NVFP4 (W4A4), every expert has its static input scales with gate and up sharing one (what
the converter writes); otherwise the MoE loops over its experts' own linears. The kernel takes bf16 activations and
rounds its intermediates to bf16 (its spec): the runner's activations on CUDA are bf16 already; a float32 run gives
the routed experts bf16-rounded inputs there, where the loop would quantize the float32 values. The stack is a copy
built once per load: its key is the identity of the first expert's codes, so loading other weights (a streamed
layer) rebuilds it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsquant.runner.linear import QuantLinear


class FusedExperts(NamedTuple):
    """The stacked experts (ExpertWeights) and, for NVFP4, their activation scales float32 [E] (gate/up, down)."""

    weights: object
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None


def _input_scales(linears) -> tuple[torch.Tensor, torch.Tensor] | None:
    """NVFP4 gate/up and down input scales [E], or None when one is dynamic or gate and up differ."""
    a13, a2 = [], []
    for gate, up, down in linears:
        s = (gate.w.input_scale, up.w.input_scale, down.w.input_scale)
        if any(t is None for t in s) or not torch.equal(s[0].float().reshape(()), s[1].float().reshape(())):
            return None
        a13.append(s[0].float().reshape(()))
        a2.append(s[2].float().reshape(()))
    return torch.stack(a13), torch.stack(a2)


def expert_stack(held: tuple | None, linears: list[tuple[QuantLinear, QuantLinear, QuantLinear]]):
    """(key, FusedExperts) for the experts' (gate, up, down) linears, reusing `held` while the weights are the same;
    None when the loop must run (module docstring)."""
    ws = [(g.w, u.w, d.w) for g, u, d in linears]
    if not ws or any(w is None for t in ws for w in t):
        return None
    if any(m._forward_pre_hooks or m._forward_hooks for t in linears for m in t):
        return None  # someone observes the experts' own inputs (calibration's hooks): they must run as linears
    kinds = {(w.fmt, w.act) for t in ws for w in t}
    gate, fmt = linears[0][0], ws[0][0].format
    if len(kinds) != 1 or fmt.fused_moe_act != ws[0][0].act or gate.in_features % 128 or gate.out_features % 128:
        return None
    key = id(ws[0][0].q)
    if held is not None and held[0] == key:
        return held
    scales = _input_scales(linears) if fmt.has_global_scale else (None, None)
    if scales is None:
        return None
    from dsquant.kernels.moe import stack_experts

    parts = [[(w.q, w.scale, w.global_scale) for w in col] for col in zip(*ws)]
    return key, FusedExperts(stack_experts(fmt.kernel_code, *parts), *scales)


def fused_routed(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fe: FusedExperts, swiglu_limit: float = 0.0
) -> torch.Tensor:
    """x [T, D], routing weights float32 [T, k], expert ids [T, k] -> the routed experts' sum, float32 [T, D]."""
    from dsquant.kernels.moe import fused_moe

    ew = fe.weights
    return fused_moe(x.to(torch.bfloat16), ew.w13, ew.w2, weights, ids.to(torch.int32), fmt=ew.fmt,
                     w13_scale=ew.w13_scale, w2_scale=ew.w2_scale, w13_global_scale=ew.w13_global_scale,
                     w2_global_scale=ew.w2_global_scale, swiglu_limit=swiglu_limit, a13_scale=fe.a13_scale,
                     a2_scale=fe.a2_scale).float()  # fmt: skip
