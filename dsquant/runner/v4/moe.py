"""DeepSeek-V4 MoE: `sqrtsoftplus` router (hash routing on the first layers), clamped SwiGLU experts, shared expert.

Router (official `ffn.gate`): logits = x @ weight^T in float32, scores = sqrt(softplus(logits)); non-hash
layers pick the top-k of scores + `bias` [E], hash layers take `tid2eid[token]` [V, k]; weights = the chosen
scores / their sum * routed_scaling_factor (dsquant.runner.routing.route).
Experts (`w1` gate, `w3` up, `w2` down): w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L)), L = swiglu_limit
(no clamp when it is 0); the shared expert clamps the same way. Output = routed sum + shared expert.
On the triton path (CUDA) the router is dsquant.kernels.moe.deepseek_route (sqrtsoftplus, bias, tid2eid) and
the routed experts run on the fused MoE kernel when their format allows (dsquant.runner.fused_experts: FP8 with
either grid, MXFP4, NVFP4 with static input scales); the reference path and other formats loop over the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsquant.runner.fused_experts import expert_stack, fused_routed
from dsquant.runner.linear import QuantLinear
from dsquant.runner.model import Weighted, experts_ref
from dsquant.runner.ops import KernelOps, kernels_can_run
from dsquant.runner.routing import route
from dsquant.runner.v4.args import V4Args


class Expert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float, impl: str):
        super().__init__()
        self.w1, self.w3 = QuantLinear(dim, inter, impl), QuantLinear(dim, inter, impl)
        self.w2 = QuantLinear(inter, dim, impl)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if self.limit > 0:
            gate, up = gate.clamp(max=self.limit), up.clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(Weighted):
    """weight [E, D]; buffer `bias` float32 [E] (top-k layers) or `tid2eid` int [V, k] (hash layers)."""

    def __init__(self, args: V4Args, hashed: bool):
        super().__init__(args.n_routed_experts, args.dim)
        self.args, self.hashed = args, hashed
        self.register_buffer("tid2eid" if hashed else "bias", None)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, kernel: bool = False):
        """x [T, D], tokens [T] -> (weights float32 [T, k], expert ids [T, k]: int64, int32 from the kernel)."""
        logits = F.linear(x.float(), self.weight.float())
        if kernel:
            from dsquant.kernels.moe import deepseek_route

            a = self.args
            return deepseek_route(logits, None if self.hashed else self.bias, top_k=a.n_activated_experts,
                                  routed_scaling_factor=a.route_scale, norm_topk_prob=a.norm_topk_prob,
                                  scoring=a.score_func, method=a.topk_method,
                                  tid2eid=self.tid2eid if self.hashed else None,
                                  token_ids=tokens if self.hashed else None)  # fmt: skip
        if self.hashed:
            return route(logits, None, self.args, self.tid2eid[tokens].long())
        return route(logits, self.bias, self.args)


class MoE(nn.Module):
    def __init__(self, args: V4Args, layer: int, impl: str, ops: KernelOps | None = None):
        super().__init__()
        self.ops, self.limit = ops, args.swiglu_limit
        self._stack: tuple | None = None  # (identity of the loaded weights, FusedExperts)
        self.gate = Gate(args, args.is_hash_layer(layer))
        self.experts = nn.ModuleList(
            Expert(args.dim, args.moe_inter_dim, args.swiglu_limit, impl) for _ in range(args.n_routed_experts)
        )
        inter = args.n_shared_experts * args.moe_inter_dim
        self.shared_experts = Expert(args.dim, inter, args.swiglu_limit, impl) if args.n_shared_experts else None
        self.last_counts: torch.Tensor | None = None  # tokens per expert in the last forward (tests, statistics)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], tokens [B, S] -> [B, S, D]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        kernel = self.ops is not None and self.ops.impl == "triton" and kernels_can_run(x) and not self.training
        weights, ids = self.gate(x, tokens.reshape(-1), kernel)
        self.last_counts = torch.bincount(ids.flatten().long(), minlength=len(self.experts))
        if kernel:
            self._stack = expert_stack(self._stack, [(e.w1, e.w3, e.w2) for e in self.experts])
        if kernel and self._stack is not None:
            y = fused_routed(x, weights, ids, self._stack[1], self.limit)
        else:
            y = experts_ref(x, weights, ids.long(), self.experts, self.last_counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
