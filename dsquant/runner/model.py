"""A minimal DeepSeek-V3 model after DeepSeek-V3 `inference/model.py`, executing stored formats directly.

Modules are named as the Hugging Face checkpoint names them (`model.layers.{i}.self_attn.kv_b_proj`),
so load.py assigns tensors by name with no rename table. Layers `num_hidden_layers ..` are the MTP
(NextN) layers; the main forward skips them, `mtp_logits` runs them.

MLA uses the absorbed projections: kv_b_proj [H * (nope + v), C] is split per head into its nope half
(multiplied into the query) and its v half (applied to the attention output), so attention runs on
the C = kv_lora_rank latent cache, as in DeepSeek's `attn_impl="absorb"` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsquant.kernels.mla.reference import mla_attention_ref
from dsquant.kernels.rope.reference import rope_cache_ref
from dsquant.runner.config import ModelArgs
from dsquant.runner.dsa import Indexer
from dsquant.runner.fused_experts import expert_stack, fused_routed
from dsquant.runner.linear import QuantLinear
from dsquant.runner.ops import KernelOps, kernels_can_run
from dsquant.runner.routing import route


class Weighted(nn.Module):
    """Holder of a plain weight tensor (norms, embeddings): a buffer when loaded, a Parameter in training."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape
        self.register_buffer("weight", None)


class RMSNorm(Weighted):
    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__(dim)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(Weighted):
    """LayerNorm with weight and bias (V3.2's indexer keys), in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim)
        self.eps = eps
        self.register_buffer("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Embedding(Weighted):
    def forward(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(tokens, self.weight).to(dtype)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, ops: KernelOps, impl: str):
        super().__init__()
        self.args, self.ops = args, ops
        h, d = args.n_heads, args.dim
        if args.q_lora_rank:
            self.q_a_proj = QuantLinear(d, args.q_lora_rank, impl)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps, ops)
            self.q_b_proj = QuantLinear(args.q_lora_rank, h * args.qk_head_dim, impl)
        else:
            self.q_proj = QuantLinear(d, h * args.qk_head_dim, impl)
        self.kv_a_proj_with_mqa = QuantLinear(d, args.kv_lora_rank + args.qk_rope_head_dim, impl)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps, ops)
        self.kv_b_proj = QuantLinear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), impl)
        self.o_proj = QuantLinear(h * args.v_head_dim, d, impl)
        # FP8 latent-cache scale float32 [] when the checkpoint stores one for this layer (load.py)
        self.register_buffer("k_scale", None)
        ex = args.extra  # V3.2 (DeepseekV32ForCausalLM): sparse attention over the indexer's top-k keys
        self.indexer = None
        if ex.get("index_topk") and args.q_lora_rank:
            self.indexer = Indexer(
                d,
                args.q_lora_rank,
                ex["index_n_heads"],
                ex["index_head_dim"],
                args.qk_rope_head_dim,
                ex["index_topk"],
                LayerNorm(ex["index_head_dim"]),
                impl,
            )

    def kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj as float32 [H, nope + v, C], dequantized for this call (small: 32 MB on V3)."""
        a = self.args
        return self.kv_b_proj.dense_weight().view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)

    def forward(self, x: torch.Tensor, start_pos: int, rope, cache=None) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; with a cache (cache.LayerCache) the latent rows of positions
        start_pos.. are stored (quantized for FP8) and attention reads every cached row back."""
        a = self.args
        b, s, _ = x.shape
        q_res = self.q_a_layernorm(self.q_a_proj(x)) if a.q_lora_rank else None
        q = self.q_b_proj(q_res) if a.q_lora_rank else self.q_proj(x)
        q = q.view(b, s, a.n_heads, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c.contiguous())
        q_pe, k_pe = q_pe.contiguous(), k_pe.contiguous()
        positions = torch.arange(start_pos, start_pos + s, device=x.device).repeat(b)
        cos, sin = rope
        keep = None if self.indexer is None else self.indexer(x, q_res, rope, start_pos)  # [B, S, T] or all
        self.ops.apply_rope(q_pe.view(b * s, a.n_heads, -1), k_pe.view(b * s, -1), cos, sin, positions)
        wkv_b = self.kv_b_weight().to(x.device)  # [H, nope + v, C]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope.float(), wkv_b[:, : a.qk_nope_head_dim])
        if cache is None:  # one window, no cache: attend over this window's fresh latents
            o = mla_attention_ref(q_lat, q_pe, kv_c, k_pe, a.softmax_scale, start_pos, keep)  # [B, S, H, C]
        else:
            cache.use_scale(self.k_scale)
            cache.store(kv_c, k_pe, start_pos)
            o = cache.attend(q_lat, q_pe, start_pos, a.softmax_scale, keep)
        o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, a.qk_nope_head_dim :])
        return self.o_proj(o.flatten(2).to(x.dtype))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); dense layers, experts and shared experts."""

    def __init__(self, dim: int, inter: int, impl: str):
        super().__init__()
        self.gate_proj, self.up_proj = QuantLinear(dim, inter, impl), QuantLinear(dim, inter, impl)
        self.down_proj = QuantLinear(inter, dim, impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(Weighted):
    """DeepSeek router: weight [E, D] (BF16), e_score_correction_bias [E] (FP32, V3 noaux_tc only)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args.n_routed_experts, args.dim)
        self.args = args
        self.register_buffer("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights float32 [T, k], expert ids int64 [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.e_score_correction_bias, self.args)


def experts_ref(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleList, counts: torch.Tensor
) -> torch.Tensor:
    """x [T, D], routing weights [T, k] and expert ids [T, k] -> float32 [T, D]: each token's routed experts
    weighted and summed, one expert at a time over the tokens it received (counts [E] > 0)."""
    y = torch.zeros_like(x, dtype=torch.float32)
    for e in torch.nonzero(counts).flatten().tolist():
        rows, slot = torch.where(ids == e)
        y.index_add_(0, rows, experts[e](x[rows]).float() * weights[rows, slot, None])
    return y


class MoE(nn.Module):
    """Routed experts + shared expert. On the triton path, experts whose stored format the fused kernel executes
    (dsquant.runner.fused_experts) run through dsquant.kernels.moe.fused_moe (one grouped launch); other formats
    and the reference path loop over the experts' own linears."""

    def __init__(self, args: ModelArgs, impl: str, ops: KernelOps | None = None):
        super().__init__()
        self.ops = ops
        self._stack: tuple | None = None  # (identity of the loaded weights, FusedExperts)
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim, impl) for _ in range(args.n_routed_experts))
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, impl) if args.n_shared_experts else None
        )
        self.last_counts: torch.Tensor | None = None  # tokens per expert in the last forward (bias update, tests)

    def _fused_stack(self, x: torch.Tensor):
        """The experts stacked for fused_moe (built once per load), or None when the loop must run."""
        if self.ops is None or self.ops.impl != "triton" or not kernels_can_run(x) or self.training:
            return None
        self._stack = expert_stack(self._stack, [(e.gate_proj, e.up_proj, e.down_proj) for e in self.experts])
        return None if self._stack is None else self._stack[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts))
        self.last_counts = counts
        stack = self._fused_stack(x)
        if stack is not None:
            y = fused_routed(x, weights, ids, stack)
        else:
            y = experts_ref(x, weights, ids, self.experts, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, ops: KernelOps, impl: str):
        super().__init__()
        self.self_attn = MLA(args, ops, impl)
        self.mlp = MoE(args, impl, ops) if args.is_moe_layer(layer) else MLP(args.dim, args.inter_dim, impl)
        self.input_layernorm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        self.ops, self.eps = ops, args.rms_norm_eps

    def forward(self, h: torch.Tensor, start_pos: int, rope, cache=None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), start_pos, rope, cache)
        x, h = self.ops.fused_add_rms_norm(attn, h, self.post_attention_layernorm.weight, self.eps)
        return h + self.mlp(x)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs, ops: KernelOps, impl: str):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        self.head = QuantLinear(args.dim, args.vocab_size, impl)


class MTPBlock(Block):
    """DeepSeek-V3 multi-token prediction layer: h' = eh_proj([enorm(emb(t+1)); hnorm(h)]) -> block -> head."""

    def __init__(self, args: ModelArgs, layer: int, ops: KernelOps, impl: str):
        super().__init__(args, layer, ops, impl)
        self.embed_tokens = Embedding(args.vocab_size, args.dim)
        self.enorm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        self.hnorm = RMSNorm(args.dim, args.rms_norm_eps, ops)
        self.eh_proj = QuantLinear(2 * args.dim, args.dim, impl)
        self.shared_head = SharedHead(args, ops, impl)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs, ops: KernelOps, impl: str, mtp: bool):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.dim)
        n_mtp = args.n_mtp_layers if mtp else 0
        self.layers = nn.ModuleList(
            (Block if i < args.n_layers else MTPBlock)(args, i, ops, impl) for i in range(args.n_layers + n_mtp)
        )
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, ops)


class Transformer(nn.Module):
    """DeepSeek-V3/V2/Kimi-K2 decoder. impl selects kernels ("reference" on CPU, "triton" on CUDA).

    forward(tokens [B, S], start_pos, caches) -> logits float32 [B, S, vocab]. Weights are filled by
    load.py (stored formats) or demo_train.py (trainable float32); nothing is allocated here.
    """

    def __init__(self, args: ModelArgs, impl: str = "reference", dtype: torch.dtype = torch.float32, mtp: bool = True):
        super().__init__()
        self.args, self.impl, self.dtype = args, impl, dtype
        self.ops = KernelOps(impl)
        self.model = Decoder(args, self.ops, impl, mtp)
        self.lm_head = QuantLinear(args.dim, args.vocab_size, impl)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, max_pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin cache float32 [P, R/2], grown to cover max_pos (built once per length, per model)."""
        if self._rope is None or self._rope[0].shape[0] < max_pos or self._rope[0].device != device:
            n = max(max_pos, 1 << (max_pos - 1).bit_length())
            a = self.args
            cos, sin = rope_cache_ref(a.qk_rope_head_dim, n, a.rope_theta, a.rope_scaling)
            self._rope = (cos.to(device), sin.to(device))
        return self._rope

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens, self.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h)).float()

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches=None, return_hidden: bool = False):
        rope = self.rope(start_pos + tokens.shape[1], tokens.device)
        h = self.embed(tokens)
        for i in range(self.args.n_layers):
            h = self.model.layers[i](h, start_pos, rope, None if caches is None else caches[i])
        logits = self.head(h)
        return (logits, h) if return_hidden else logits

    def mtp_logits(self, h: torch.Tensor, next_tokens: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP head: hidden states h [B, S, D] of positions i and tokens i+1 [B, S] -> logits for i+2."""
        blk = self.model.layers[self.args.n_layers + depth]
        rope = self.rope(h.shape[1], h.device)
        e = blk.enorm(blk.embed_tokens(next_tokens, self.dtype))
        x = blk.eh_proj(torch.cat([e, blk.hnorm(h)], dim=-1))
        x = Block.forward(blk, x, 0, rope)
        return blk.shared_head.head(blk.shared_head.norm(x)).float()
