"""DeepSeek-V4 MoE: `sqrtsoftplus` router (hash routing on the first layers), clamped SwiGLU experts, shared expert.

Router (official `ffn.gate`): logits = x @ weight^T in float32, scores = sqrt(softplus(logits)); non-hash
layers pick the top-k of scores + `bias` [E], hash layers take `tid2eid[token]` [V, k]; weights = the chosen
scores / their sum * routed_scaling_factor (dsquant.runner.routing.route).
Experts (`w1` gate, `w3` up, `w2` down): w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L)), L = swiglu_limit
(no clamp when it is 0); the shared expert clamps the same way. Output = routed sum + shared expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsquant.runner.linear import QuantLinear
from dsquant.runner.model import Weighted, experts_ref
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

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], tokens [T] -> (weights float32 [T, k], expert ids int64 [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        if self.hashed:
            return route(logits, None, self.args, self.tid2eid[tokens].long())
        return route(logits, self.bias, self.args)


class MoE(nn.Module):
    def __init__(self, args: V4Args, layer: int, impl: str):
        super().__init__()
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
        weights, ids = self.gate(x, tokens.reshape(-1))
        self.last_counts = torch.bincount(ids.flatten(), minlength=len(self.experts))
        y = experts_ref(x, weights, ids, self.experts, self.last_counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
