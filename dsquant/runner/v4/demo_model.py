"""The DeepSeek-V4 demo model's architecture: its config.json, a trainable runner model, its official tensors.

Every V4 layer kind at a few MB (dims multiples of 128, as the releases, so every 128x128 FP8 grid is whole):
four layers with compress_ratios [0, 4, 128, 4], sliding-window only, CSA (compressor + lightning indexer),
HCA, CSA, the first two routed by token id (tid2eid), the others by sqrtsoftplus scores + bias; 4 hc_mult
streams with 20 Sinkhorn iterations; one shared 128-wide KV head of 2 query heads (64 rotated channels),
grouped output projection (2 groups); 8 routed experts (top-2, 128 wide) + 1 shared, swiglu_limit 10. No MTP
block (the runner does not build it). Byte-level vocabulary as the V3 demo (ids 0-255 bytes, 256 BOS, 257 EOS).

`trainable_model` fills the runner's V4 Transformer with float32 Parameters named as the official tensors, so
that after training `official_tensors` stores the state dict in the release's mixed format (checkpoint.synth_v4).
"""

from __future__ import annotations

import torch
from torch import nn

from dsquant.checkpoint.names_v4 import expected_tensors
from dsquant.checkpoint.synth_v4 import store_v4_tensors, v4_config
from dsquant.runner.linear import QuantLinear
from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.model import Transformer

DEMO_V4_CONFIG = {
    **v4_config("flash"),
    "vocab_size": 258, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 128,
    "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_lora_rank": 128, "o_groups": 2, "moe_intermediate_size": 128,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "num_hash_layers": 2, "index_n_heads": 2,
    "index_head_dim": 128, "index_topk": 16, "compress_ratios": [0, 4, 128, 4], "num_nextn_predict_layers": 0,
    "bos_token_id": 256, "eos_token_id": 257,
}  # fmt: skip
INIT_STD = 0.02


def _initial(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """transformers' DeepseekV4 init: norms 1, mHC scales 1, biases / sinks / position biases 0, the rest N(0, std)."""
    if name.endswith("norm.weight") or name.endswith("_scale"):
        return torch.ones(shape)
    if name.endswith(("_base", "attn_sink", ".ape", "gate.bias")):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * INIT_STD


def trainable_model(config: dict = DEMO_V4_CONFIG, seed: int = 0) -> Transformer:
    """The runner's V4 model with every official tensor a float32 Parameter, except the router bias (float32
    buffer, moved by the balancing rule) and tid2eid (a fixed random table: distinct experts per token id)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(V4Args.from_config(config), dtype=torch.float32)
    for spec in expected_tensors(config):
        prefix, _, attr = spec.name.rpartition(".")
        mod = model.get_submodule(prefix)
        if spec.kind == "i64":
            ranks = torch.rand((spec.shape[0], config["n_routed_experts"]), generator=gen).argsort(dim=1)
            mod.tid2eid = ranks[:, : spec.shape[1]].contiguous()
        elif attr == "bias" and prefix.endswith("ffn.gate"):
            mod.bias = _initial(spec.name, spec.shape, gen)
        elif isinstance(mod, QuantLinear):
            mod.weight, mod.w = nn.Parameter(_initial(spec.name, spec.shape, gen)), None
        else:
            setattr(mod, attr, nn.Parameter(_initial(spec.name, spec.shape, gen)))
    return model


def official_tensors(state: dict[str, torch.Tensor], config: dict = DEMO_V4_CONFIG) -> dict[str, torch.Tensor]:
    """A trained state dict (official names, float) -> the release's stored tensors (FP8 + E8M0 grids, MXFP4
    experts, BF16 / F32 / I64 as the release keeps them)."""
    return store_v4_tensors(config, lambda spec: state[spec.name].detach().cpu())
