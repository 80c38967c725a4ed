"""DeepSeek-V4 attention: one shared K=V head, a sliding window plus compressed entries (HCA, CSA + indexer).

Per layer, with hd = head_dim, r = rope_head_dim (the last r channels of every head are rotated), W = window:
    q   = rms(wq_b(q_norm(wq_a(x)))) per head (unweighted), RoPE;  kv = kv_norm(wkv(x)) [S, hd], RoPE; K = V = kv
    raw keys: query t sees t-W+1 .. t;  compressed entries (Compressor) appended after them
    logits = q.k * hd^-0.5; a per-head sink logit `attn_sink` joins the softmax and is dropped after it
    out = inverse RoPE (angle -pos) on P.V, then the grouped projection: wo_a [g*o_lora, H*hd/g] applied per
          group of heads, wo_b mixes the g*o_lora outputs
Sliding-only layers (ratio 0) rotate with the "main" table, compressed layers with the "compress" table.
HCA (ratio m): one entry per complete window of m tokens, visible to query t once the window is closed
(w < (t+1) // m), all of them attended. CSA (ratio csa_ratio, 4): overlapping windows (entry w pools the
first-half channels of window w-1 and the second-half channels of window w), and the lightning indexer keeps
the top-`index_topk` closed entries per query.

This follows transformers 5.25's DeepseekV4Attention / DeepseekV4{HCA,CSA}Compressor / DeepseekV4Indexer,
which run the official math without its quantization simulation: the official `inference/model.py` also
round-trips the window and compressed KV through FP8 and the indexer's q/k through a Hadamard rotation and
FP4. The runner does neither: those change the model only by the precision of an FP8/FP4 KV cache.
A forward runs a whole sequence from position 0, or continues one from a KV cache (v4/cache.py).
"""

from __future__ import annotations

import torch
from torch import nn

from dsquant.kernels.rope.reference import rotate_pairs_
from dsquant.runner.dsa import index_scores
from dsquant.runner.linear import QuantLinear
from dsquant.runner.model import RMSNorm
from dsquant.runner.ops import KernelOps
from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.cache import CompressorState, LayerCache


def rope_tail(
    x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """x [B, S, ..., d] -> a copy with its last r channels rotated at positions [S] (angle -pos if inverse).

    rope: cos/sin float32 [P, r/2]."""
    cos, sin = rope
    r = 2 * cos.shape[-1]
    shape = (positions.shape[0],) + (1,) * (x.dim() - 3) + (r // 2,)
    c, s = cos[positions].view(shape), sin[positions].view(shape)
    out = x.clone()
    rotate_pairs_(out[..., -r:], c, -s if inverse else s)
    return out


class Compressor(nn.Module):
    """Pools windows of `ratio` tokens into entries of `width` channels (softmax gate per channel).

    Official names: wkv, wgate [width * (2 if overlap else 1), D], ape float32 [ratio, width * (1|2)], norm [width].
    """

    def __init__(self, args: V4Args, ratio: int, width: int, overlap: bool, ops: KernelOps, impl: str):
        super().__init__()
        self.ratio, self.width, self.overlap = ratio, width, overlap
        out = width * (2 if overlap else 1)
        self.wkv, self.wgate = QuantLinear(args.dim, out, impl), QuantLinear(args.dim, out, impl)
        self.norm = RMSNorm(width, args.rms_norm_eps, ops)
        self.register_buffer("ape", None)

    def forward(self, x: torch.Tensor, rope, state: CompressorState | None = None) -> torch.Tensor:
        """x [B, S, D] -> entries [B, T, width] in x.dtype, entry w rotated at position w * ratio. Without a state x
        starts at position 0 and T = S // ratio; with one x continues the tokens it has seen, and T counts every
        window closed so far (the state keeps the entries and the open window's rows, v4/cache.py)."""
        m = self.ratio
        if state is None:
            n = x.shape[1] // m * m
            return self._pool(self.wkv(x[:, :n]), self.wgate(x[:, :n]), 0, None, x, rope)
        kv, gate = self.wkv(x), self.wgate(x)
        if state.kv is not None:
            kv, gate = torch.cat([state.kv, kv], dim=1), torch.cat([state.gate, gate], dim=1)
        n = kv.shape[1] // m * m
        w0 = 0 if state.entries is None else state.entries.shape[1]
        new = self._pool(kv[:, :n], gate[:, :n], w0, state.prev, x, rope)
        state.kv, state.gate = kv[:, n:].clone(), gate[:, n:].clone()
        if n and self.overlap:
            state.prev = (kv[:, n - m : n].clone(), gate[:, n - m : n].clone())
        state.entries = new if state.entries is None else torch.cat([state.entries, new], dim=1)
        return state.entries

    def _pool(self, kv: torch.Tensor, gate: torch.Tensor, w0: int, prev, x: torch.Tensor, rope) -> torch.Tensor:
        """Projected rows kv, gate [B, n * ratio, out] of windows w0.. -> their entries [B, n, width].
        prev: the (kv, gate) rows [B, ratio, out] of window w0 - 1 (overlap), None when w0 is 0."""
        b, m = kv.shape[0], self.ratio
        n_win = kv.shape[1] // m
        if n_win == 0:
            return x.new_zeros(b, 0, self.width)
        kv, gate = kv.view(b, n_win, m, -1), gate.view(b, n_win, m, -1) + self.ape
        if self.overlap:  # slots: [first half of window w-1 | second half of window w]; window -1 has weight 0
            d = self.width
            kv2 = kv.new_zeros(b, n_win, 2 * m, d)
            gate2 = gate.new_full((b, n_win, 2 * m, d), float("-inf"))
            kv2[:, :, m:], gate2[:, :, m:] = kv[..., d:], gate[..., d:]
            kv2[:, 1:, :m], gate2[:, 1:, :m] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
            if prev is not None:
                kv2[:, 0, :m], gate2[:, 0, :m] = prev[0][..., :d], (prev[1] + self.ape)[..., :d]
            kv, gate = kv2, gate2
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        positions = (w0 + torch.arange(n_win, device=x.device)) * m
        return rope_tail(self.norm(pooled), rope, positions)


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: picks the top-`index_topk` compressed entries per query.

    Scores as V3.2's (dsquant.runner.dsa.index_scores) with q = wq_b(q_residual) [nI, c] rotated at t
    and as keys the entries [c] of its own compressor. Official names:
    wq_b [nI * c, q_lora], weights_proj [nI, D], compressor.*.
    """

    def __init__(self, args: V4Args, ratio: int, ops: KernelOps, impl: str):
        super().__init__()
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.topk, self.ratio = args.index_topk, ratio
        self.wq_b = QuantLinear(args.q_lora_rank, self.n_heads * self.head_dim, impl)
        self.weights_proj = QuantLinear(args.dim, self.n_heads, impl)
        self.compressor = Compressor(args, ratio, self.head_dim, True, ops, impl)

    def forward(
        self, x: torch.Tensor, q_res: torch.Tensor, rope, positions: torch.Tensor, state: CompressorState | None = None
    ) -> torch.Tensor:
        """x [B, S, D], q_res [B, S, q_lora] at positions [S] -> entry ids int64 [B, S, k]; -1 where fewer than k
        are closed. state: its compressor's (the keys of earlier calls), v4/cache.py."""
        b, s, _ = x.shape
        keys = self.compressor(x, rope, state)  # [B, T, c]
        q = rope_tail(self.wq_b(q_res).view(b, s, self.n_heads, self.head_dim), rope, positions)
        scores = index_scores(q, keys, self.weights_proj(x))  # [B, S, T]
        closed = ((positions + 1) // self.ratio)[:, None]  # [S, 1]: entries 0 .. closed-1 are visible
        future = torch.arange(keys.shape[1], device=x.device)[None, :] >= closed
        ids = scores.masked_fill(future, float("-inf")).topk(min(self.topk, keys.shape[1]), dim=-1).indices
        return torch.where(ids >= closed, -1, ids)


class Attention(nn.Module):
    """Official names: wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink [H] and compressor / indexer."""

    def __init__(self, args: V4Args, layer: int, ops: KernelOps, impl: str):
        super().__init__()
        self.args = args
        h, hd = args.n_heads, args.head_dim
        self.ratio = args.compress_ratios[layer] if layer < args.n_layers else 0  # the MTP block: sliding only
        self.rope_kind = "compress" if self.ratio else "main"
        self.wq_a = QuantLinear(args.dim, args.q_lora_rank, impl)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps, ops)
        self.wq_b = QuantLinear(args.q_lora_rank, h * hd, impl)
        self.wkv = QuantLinear(args.dim, hd, impl)
        self.kv_norm = RMSNorm(hd, args.rms_norm_eps, ops)
        self.wo_a = QuantLinear(h * hd // args.o_groups, args.o_groups * args.o_lora_rank, impl)
        self.wo_b = QuantLinear(args.o_groups * args.o_lora_rank, args.dim, impl)
        self.register_buffer("attn_sink", None)
        csa = self.ratio == args.csa_ratio
        self.compressor = Compressor(args, self.ratio, hd, csa, ops, impl) if self.ratio else None
        self.indexer = Indexer(args, self.ratio, ops, impl) if self.ratio and csa else None

    def forward(self, x: torch.Tensor, ropes: dict, start_pos: int = 0, cache: LayerCache | None = None):
        """x [B, S, D] at positions start_pos .. -> [B, S, D]. Without a cache start_pos is 0; with one (v4/cache.py)
        the window and entries of the earlier positions come from it, and it takes this call's."""
        a = self.args
        b, s, _ = x.shape
        rope = ropes[self.rope_kind]
        positions = torch.arange(start_pos, start_pos + s, device=x.device)
        q_res = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_res).view(b, s, a.n_heads, a.head_dim)
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + a.rms_norm_eps).to(q.dtype)
        q = rope_tail(q, rope, positions)
        kv = rope_tail(self.kv_norm(self.wkv(x)), rope, positions)  # [B, S, hd]
        if cache is not None and cache.window is not None:
            kv = torch.cat([cache.window, kv], dim=1)
        if cache is not None:
            cache.window = kv[:, kv.shape[1] - min(kv.shape[1], a.window_size - 1) :].clone()
        j = torch.arange(start_pos + s - kv.shape[1], start_pos + s, device=x.device)  # the keys' positions
        visible = (j[None, :] <= positions[:, None]) & (j[None, :] > positions[:, None] - a.window_size)
        bias = torch.zeros(b, s, kv.shape[1], device=x.device).masked_fill(~visible, float("-inf"))  # [B, S, S']
        if self.compressor is not None:
            entries = self.compressor(x, rope, None if cache is None else cache.compressor)  # [B, T, hd]
            idx_state = None if cache is None else cache.indexer
            bias = torch.cat([bias, self._entry_bias(x, q_res, rope, positions, entries.shape[1], idx_state)], dim=-1)
            kv = torch.cat([kv, entries], dim=1)
        o = self._attend(q, kv, bias)
        o = rope_tail(o, rope, positions, inverse=True).flatten(2)  # [B, S, H * hd]
        g = a.o_groups
        wo_a = self.wo_a.dense_weight().view(g, a.o_lora_rank, -1)
        o = torch.einsum("bsgk,gok->bsgo", o.view(b, s, g, -1), wo_a.to(o.dtype))
        return self.wo_b(o.flatten(2))

    def _entry_bias(self, x, q_res, rope, positions, n_entries: int, state: CompressorState | None) -> torch.Tensor:
        """float32 [B, S, T]: 0 where query t may read compressed entry w, -inf elsewhere."""
        b, s = x.shape[:2]
        if self.indexer is None:  # HCA: every closed window
            closed = ((positions + 1) // self.ratio)[:, None]
            hidden = torch.arange(n_entries, device=x.device)[None, :] >= closed
            return torch.zeros(b, s, n_entries, device=x.device).masked_fill(hidden, float("-inf"))
        ids = self.indexer(x, q_res, rope, positions, state)  # [B, S, k], -1 = none
        bias = torch.full((b, s, n_entries + 1), float("-inf"), device=x.device)
        bias.scatter_(-1, torch.where(ids >= 0, ids, n_entries), 0.0)
        return bias[..., :n_entries]

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [B, S, H, hd], kv [B, T', hd], bias [B, S, T'] -> [B, S, H, hd] with the sink in the softmax."""
        logits = torch.einsum("bshd,btd->bhst", q, kv) * self.args.head_dim**-0.5 + bias.unsqueeze(1)
        sink = self.attn_sink.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        logits = torch.cat([logits.float(), sink], dim=-1)
        p = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]
        return torch.einsum("bhst,btd->bshd", p.to(kv.dtype), kv)
