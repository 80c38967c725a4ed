"""A DeepSeek-V4 decoder in plain torch after DeepSeek-V4 `inference/model.py`, executing stored formats directly.

Modules carry the official (unprefixed) checkpoint names, `layers.{i}.attn.wq_a`, `layers.{i}.ffn.experts.{e}.w1`,
`layers.{i}.hc_attn_fn`, `hc_head_fn`, `embed`, `head`, so an official state dict loads by name (v4/load.py).
Block: X <- hc_post(attn(attn_norm(hc_pre(X)))); X <- hc_post(ffn(ffn_norm(hc_pre(X)))) over hc_mult streams
(hyper.py); the head collapses the streams (hc_head), normalises and projects. The MTP block (`mtp.0`, built on
request) does not take part in the logits; calibration runs it to see its experts' inputs (MTPBlock).
"""

from __future__ import annotations

import torch
from torch import nn

from dsquant.kernels.rope.reference import rope_cache_ref
from dsquant.runner.linear import QuantLinear
from dsquant.runner.model import Embedding, RMSNorm
from dsquant.runner.ops import KernelOps
from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.attention import Attention
from dsquant.runner.v4.cache import LayerCache, V4Cache
from dsquant.runner.v4.hyper import hc_head, hc_post, hc_pre
from dsquant.runner.v4.moe import MoE

HC_PARAMS = ("fn", "base", "scale")


class Block(nn.Module):
    def __init__(self, args: V4Args, layer: int, ops: KernelOps, impl: str):
        super().__init__()
        self.args = args
        self.attn = Attention(args, layer, ops, impl)
        self.ffn = MoE(args, layer, impl, ops)
        self.attn_norm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        self.ffn_norm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        for site in ("attn", "ffn"):
            for p in HC_PARAMS:
                self.register_buffer(f"hc_{site}_{p}", None)

    def forward(
        self, x: torch.Tensor, ropes: dict, tokens: torch.Tensor, start_pos: int = 0, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Streams x [B, S, n, D], tokens [B, S] (hash routing) at positions start_pos .. -> streams [B, S, n, D]."""
        y, post, comb = hc_pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.args)
        x = hc_post(x, self.attn(self.attn_norm(y), ropes, start_pos, cache), post, comb)
        y, post, comb = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.args)
        return hc_post(x, self.ffn(self.ffn_norm(y), tokens), post, comb)


class MTPBlock(Block):
    """DeepSeek-V4's MTP draft block, after the official MTPBlock: a sliding-window, score-routed Block fed
    e_proj(enorm(embed(next tokens))) + h_proj(hnorm(X)) per stream, X the backbone's last streams. Official names
    `mtp.0.{e_proj, h_proj, enorm, hnorm, norm, hc_head_*}` beside the Block's; embed and head are the backbone's."""

    def __init__(self, args: V4Args, layer: int, ops: KernelOps, impl: str):
        super().__init__(args, layer, ops, impl)
        self.e_proj, self.h_proj = QuantLinear(args.dim, args.dim, impl), QuantLinear(args.dim, args.dim, impl)
        self.enorm, self.hnorm, self.norm = (RMSNorm(args.dim, args.rms_norm_eps, ops) for _ in range(3))
        for p in HC_PARAMS:
            self.register_buffer(f"hc_head_{p}", None)

    def draft(self, x: torch.Tensor, embedded: torch.Tensor, ropes: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Backbone streams x [B, S, n, D], embedded next tokens [B, S, D] (tokens [B, S]) -> streams [B, S, n, D]."""
        h = self.e_proj(self.enorm(embedded)).unsqueeze(2) + self.h_proj(self.hnorm(x))
        return self(h, ropes, tokens)


class Transformer(nn.Module):
    """DeepSeek-V4 decoder. forward(tokens [B, S], start_pos, cache) -> logits float32 [B, S, vocab].

    Without a cache tokens start at position 0; with a V4Cache (v4/cache.py), at start_pos: 0 or the positions it
    holds (the V3 runner's calling convention, so eval and generate drive both). Weights are filled by v4/load.py.
    """

    def __init__(self, args: V4Args, impl: str = "reference", dtype: torch.dtype = torch.float32, mtp: bool = False):
        super().__init__()
        self.args, self.impl, self.dtype = args, impl, dtype
        self.ops = KernelOps(impl)
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, self.ops, impl) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, self.ops)
        self.head = QuantLinear(args.dim, args.vocab_size, impl)
        for p in HC_PARAMS:
            self.register_buffer(f"hc_head_{p}", None)
        n_mtp = args.mtp_blocks() if mtp else 0
        self.mtp = nn.ModuleList(MTPBlock(args, args.n_layers + i, self.ops, impl) for i in range(n_mtp))
        self._ropes: dict | None = None

    def ropes(self, max_pos: int, device: torch.device) -> dict:
        """{"main", "compress"}: cos/sin float32 [P, r/2], grown to cover max_pos."""
        if self._ropes is None or self._ropes["main"][0].shape[0] < max_pos or self._ropes["main"][0].device != device:
            n = max(max_pos, 1 << (max_pos - 1).bit_length())
            a = self.args
            tables = {
                "main": rope_cache_ref(a.rope_head_dim, n, a.rope_theta),
                "compress": rope_cache_ref(a.rope_head_dim, n, a.compress_rope_theta, a.compress_rope_scaling()),
            }
            self._ropes = {k: (cos.to(device), sin.to(device)) for k, (cos, sin) in tables.items()}
        return self._ropes

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: V4Cache | None = None) -> torch.Tensor:
        if cache is None and start_pos:
            raise ValueError("the V4 runner needs a V4Cache to continue a sequence at start_pos > 0")
        if cache is not None:
            cache.advance(start_pos, tokens.shape[1])
        ropes = self.ropes(start_pos + tokens.shape[1], tokens.device)
        x = self.streams(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes, tokens, start_pos, None if cache is None else cache.layers[i])
        return self.logits(x)

    def streams(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> the embedding copied to hc_mult streams [B, S, n, D] in the activation dtype."""
        h = self.embed(tokens, self.dtype)
        return h.unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Streams [B, S, n, D] -> logits float32 [B, S, vocab] (hyper-head, norm, head)."""
        h = hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.args)
        return self.head(self.norm(h)).float()
