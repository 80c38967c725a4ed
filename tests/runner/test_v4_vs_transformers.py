"""Ground truth for the DeepSeek-V4 runner: transformers' DeepseekV4ForCausalLM on the same official checkpoint.

A random transformers model is written as an official-layout checkpoint (unprefixed names, per-expert
w1/w2/w3, `.attn.`, `.ffn.`, `hc_attn_fn`, ...), with a config.json in the official keys; transformers
reloads it through its own conversion mapping (the test checks it recovers every tensor it started from,
which checks the name table below), and the runner loads the same files. Both run in float32 on tokens
longer than the window and than every compression ratio, so window masking, HCA entries, CSA entries and
the indexer's top-k all shape the logits.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.load import load_tensors
from dsquant.runner.v4.model import Transformer

transformers = pytest.importorskip("transformers")

# transformers name (after its conversion) -> official name; applied in order, first matching rule per pattern
HF_TO_OFFICIAL = [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_", "hc_head_"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.", r".hc_\1_"),
    (r"\.sinks$", ".attn_sink"),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"compressor\.position_bias$", "compressor.ape"),
    (r"compressor\.kv_proj\.", "compressor.wkv."),
    (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
]

TINY = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=64, hidden_size=32,
    moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=8,
    q_lora_rank=24, o_groups=2, o_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5,
    swiglu_limit=1.0, hidden_act="silu", rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32,
                  "beta_slow": 1},
    index_n_heads=4, index_head_dim=16, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    max_position_embeddings=4096, num_nextn_predict_layers=1, tie_word_embeddings=False, initializer_range=0.15,
)  # fmt: skip

# the official schedule keys (compress_ratios 0/4/128 with an MTP sentinel, num_hash_layers), and the keys
# transformers itself writes (layer_types + compress_rates), here with a small HCA ratio
OFFICIAL = dict(TINY, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=2,
                sliding_window=16, index_topk=5)  # fmt: skip
HF_KEYS = dict(TINY, num_hidden_layers=4, mlp_layer_types=["hash_moe", "moe", "moe", "moe"], sliding_window=8,
               layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention",
                            "compressed_sparse_attention"],
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, index_topk=3)


def to_official(name: str) -> str:
    for pattern, repl in HF_TO_OFFICIAL:
        name = re.sub(pattern, repl, name)
    return name


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers state dict -> official names, routed experts split per expert (w1 rows first in gate_up)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = to_official(name[: -len(".gate_up_proj")]), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = t[e, :inter].contiguous()
                out[f"{prefix}.{e}.w3.weight"] = t[e, inter:].contiguous()
        elif name.endswith("experts.down_proj"):
            prefix = to_official(name[: -len(".down_proj")])
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = t[e].contiguous()
        else:
            out[to_official(name)] = t.contiguous()
    return out


def random_hf_model(config: dict, seed: int = 0):
    """A transformers V4 model with every tensor random (norms near 1, tid2eid distinct experts per token)."""
    cfg = transformers.DeepseekV4Config(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[: t.shape[1]] for _ in range(t.shape[0])]))
            elif "norm" in name:
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif name.endswith(("sinks", "position_bias", "e_score_correction_bias", "base")):
                t.copy_(0.5 * torch.randn_like(t))
            elif name.endswith(("scale", "hc_scale")):
                t.copy_(1 + 0.3 * torch.randn_like(t))
    return model


def write_official(model, config: dict, path) -> dict[str, torch.Tensor]:
    sd = official_state_dict(model)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return sd


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", [OFFICIAL, HF_KEYS], ids=["official_keys", "transformers_keys"])
def test_v4_logits_match_transformers(tmp_path, config):
    source = random_hf_model(config)
    write_official(source, config, tmp_path)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded, original = hf.state_dict(), source.state_dict()
    assert set(reloaded) == set(original), "transformers' conversion and HF_TO_OFFICIAL disagree on names"
    for name, t in original.items():
        assert torch.equal(reloaded[name], t), f"transformers read {name} differently from what was written"

    args = V4Args.from_file(tmp_path / "config.json")
    assert args.compress_ratios == tuple(  # the schedule both models read from the same config.json
        {"sliding_attention": 0, **hf.config.compress_rates}[t] for t in hf.config.layer_types)
    ours = Transformer(args).eval()
    load_tensors(ours, load_file(str(tmp_path / "model.safetensors")))

    tokens = torch.randint(0, config["vocab_size"], (2, 150 if 128 in config.get("compress_ratios", ()) else 40),
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        actual = ours(tokens)
    assert expected.std() > 0.3, "random weights too small to make the comparison meaningful"
    err = max_rel_err(actual, expected)
    assert err < 1e-4, f"max |logit diff| / max |logit| = {err:.3e}"
