"""The model families the runner executes, told apart by config.json `architectures`: the one dispatch point.

    deepseek_v3  DeepseekV3/V2/V32ForCausalLM  dsquant.runner.config.ModelArgs, runner/model.py (MLA, latent cache)
    deepseek_v4  DeepseekV4ForCausalLM         dsquant.runner.v4.args.V4Args, runner/v4/model.py
Layer streaming (runner/offload.py) drives either model through embed / decoder_layers / run_layer / logits.
What a family cannot do yet is refused here, by feature, with the reason (`require`).
"""

from __future__ import annotations

import torch

from dsquant.checkpoint.names import V3, V4
from dsquant.checkpoint.names_v4 import is_v4
from dsquant.runner.cache import PagedLatentCache
from dsquant.runner.config import ModelArgs
from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.cache import V4Cache
from dsquant.runner.v4.model import Transformer as V4Transformer

# family -> {feature: why it is refused}
_MISSING = {
    V4: {
        "kv_cache": "the DeepSeek-V4 runner keeps its window and compressed entries in the activation dtype, with "
                    "no FP8 KV cache (--kv-cache bf16)",
    },
}  # fmt: skip


def family_of(config: dict) -> str:
    return V4 if is_v4(config) else V3


def model_args(config: dict, name: str = "config.json") -> ModelArgs | V4Args:
    """The family's ModelArgs for a config.json dict (ValueError names the file and the problem)."""
    return (V4Args if family_of(config) == V4 else ModelArgs).from_config(config, name=name)


def require(family: str, feature: str, where: str) -> None:
    """ValueError when `family` cannot run `feature` yet, naming `where` (a checkpoint) and the reason."""
    why = _MISSING.get(family, {}).get(feature)
    if why:
        raise ValueError(f"{where}: {why}")


def new_cache(model: torch.nn.Module, batch: int, max_len: int, kv_cache: str = "bf16", device="cpu"):
    """The cache model(tokens, start_pos, cache) continues from: V3's paged latent cache (bf16 or fp8), V4's
    window and compressed entries (V4Cache, in the activation dtype: bf16 only)."""
    a = model.args
    if isinstance(a, V4Args):
        if kv_cache != "bf16":
            require(V4, "kv_cache", f"--kv-cache {kv_cache}")
        return V4Cache(a.n_layers)
    return PagedLatentCache(a.n_layers, batch, max_len, a.kv_lora_rank, a.qk_rope_head_dim, kv_dtype=kv_cache,
                            device=device, impl=model.impl)  # fmt: skip


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.layers if isinstance(model, V4Transformer) else model.model.layers


def mtp_or_layer(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Decoder layer `layer`; on DeepSeek-V4, layers from n_layers on are its MTP blocks (model.mtp), which V3
    keeps among its decoder layers."""
    if isinstance(model, V4Transformer) and layer >= model.args.n_layers:
        return model.mtp[layer - model.args.n_layers]
    return decoder_layers(model)[layer]


def embed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, S] -> the hidden state decoder layer 0 takes (V4: hc_mult streams)."""
    return model.streams(tokens) if isinstance(model, V4Transformer) else model.embed(tokens)


def run_layer(model: torch.nn.Module, layer: int, h: torch.Tensor, tokens: torch.Tensor, kv_cache: str = "bf16"):
    """One decoder layer over a whole window from position 0: hidden h (as embed returns) -> the next hidden."""
    block, s, device = decoder_layers(model)[layer], tokens.shape[1], h.device
    if isinstance(model, V4Transformer):
        return block(h, model.ropes(s, device), tokens)
    a = model.args
    cache = PagedLatentCache(1, h.shape[0], s, a.kv_lora_rank, a.qk_rope_head_dim, kv_dtype=kv_cache, device=device,
                             impl=model.impl)  # fmt: skip
    return block(h, 0, model.rope(s, device), cache[0])


def logits(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The last layer's hidden state -> logits float32 [B, S, vocab]."""
    return model.logits(h) if isinstance(model, V4Transformer) else model.head(h)
