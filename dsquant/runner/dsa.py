"""DeepSeek sparse attention's lightning indexer: V3.2 (`DeepseekV32ForCausalLM`) token selection, and the
scoring V4's CSA indexer shares.

score[t, s] = sum_h (weights_proj(x)[t, h] * nI^-0.5) * ReLU(q[t, h] . k[s]) * d^-0.5 in float32; each query
attends only to the top-`index_topk` causal keys. V3.2 (transformers 5.25 `DeepseekV32Indexer`, official
`inference/model.py` `Indexer`): q = wq_b(q_residual) [nI, d], k = LayerNorm(wk(x)) [d] (weight and bias),
both rotated on their first r = qk_rope_head_dim channels as halves (x[i], x[i + r/2]), not MLA's pairs.
Like transformers, the runner skips the official Hadamard rotation (orthogonal: scores unchanged) and FP8
scoring (precision only). While a sequence holds at most `index_topk` tokens every causal key is selected,
so attention is dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsquant.kernels.rope.reference import rotate_halves_
from dsquant.runner.linear import QuantLinear


def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q [B, S, nI, d], keys k [B, T, d], head weights [B, S, nI] -> float32 scores [B, S, T]."""
    n_heads, d = q.shape[-2:]
    scores = F.relu(torch.matmul(q.float(), k.float().transpose(-1, -2).unsqueeze(1))) * d**-0.5  # [B, S, nI, T]
    return (scores * (weights.float() * n_heads**-0.5).unsqueeze(-1)).sum(dim=2)


class Indexer(nn.Module):
    """V3.2 indexer of one MLA layer (checkpoint names `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`)."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, topk: int,
                 k_norm: nn.Module, impl: str):  # fmt: skip
        """k_norm: the LayerNorm over head_dim (the runner's weight-holding module, from the caller)."""
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.wq_b = QuantLinear(q_lora_rank, n_heads * head_dim, impl)
        self.wk = QuantLinear(dim, head_dim, impl)
        self.k_norm = k_norm
        self.weights_proj = QuantLinear(dim, n_heads, impl)

    def forward(self, x: torch.Tensor, q_res: torch.Tensor, rope, start_pos: int) -> torch.Tensor | None:
        """x [B, S, D] at positions start_pos.. (the keys are this call's tokens, so start_pos must be 0 once the
        sequence outgrows index_topk) -> keep bool [B, S, S] (True = attended), or None: all causal keys."""
        b, s, _ = x.shape
        if start_pos + s <= self.topk:
            return None
        if start_pos:
            raise ValueError(f"DeepSeek-V3.2 sparse attention beyond index_topk={self.topk} tokens needs the "
                             f"indexer keys of earlier positions, which the runner does not cache: run the whole "
                             f"sequence in one forward (positions 0..{start_pos + s - 1})")
        cos, sin = rope
        c, sn = cos[:s], sin[:s]  # [S, r/2]
        q = self.wq_b(q_res).view(b, s, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))  # [B, S, d]
        rotate_halves_(q[..., : self.rope_dim], c[:, None], sn[:, None])
        rotate_halves_(k[..., : self.rope_dim], c, sn)
        scores = index_scores(q, k, self.weights_proj(x))  # [B, S, S]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        top = scores.masked_fill(~causal, float("-inf")).topk(self.topk, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & causal
