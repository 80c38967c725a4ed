"""V4Args reads a DeepSeek-V4 config.json as transformers' DeepseekV4Config folds it (schedule, hash layers, RoPE)."""

from __future__ import annotations

import pytest
import torch

from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.model import Transformer

transformers = pytest.importorskip("transformers")

# V4-Flash's config.json (deepseek-v4.md 1.6), trailing MTP sentinel included
FLASH = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=129280, hidden_size=4096,
    num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64,
    q_lora_rank=1024, o_lora_rank=1024, o_groups=8, moe_intermediate_size=2048, n_routed_experts=256,
    n_shared_experts=1, num_experts_per_tok=6, num_hash_layers=3, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
    norm_topk_prob=True, routed_scaling_factor=1.5, swiglu_limit=10.0, hidden_act="silu", sliding_window=128,
    compress_rope_theta=160000, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                  "beta_slow": 1},
    max_position_embeddings=1048576, index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, num_nextn_predict_layers=1,
    compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0], bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)  # fmt: skip


def test_flash_config_reads_as_transformers_folds_it():
    args = V4Args.from_config(FLASH)
    cfg = transformers.DeepseekV4Config(**{k: v for k, v in FLASH.items() if k != "architectures"})
    ratios = {"sliding_attention": 0, **cfg.compress_rates}
    assert args.compress_ratios == tuple(ratios[t] for t in cfg.layer_types)
    assert [args.is_hash_layer(i) for i in range(args.n_layers)] == [t == "hash_moe" for t in cfg.mlp_layer_types]
    assert args.rope_head_dim == cfg.qk_rope_head_dim == 64
    assert (args.window_size, args.index_topk, args.o_groups, args.swiglu_limit) == (128, 512, 8, 10.0)


@pytest.mark.parametrize("kind", ["main", "compress"])
def test_rope_tables_match_transformers_at_flash_scale(kind):
    """YaRN at V4-Flash's values (factor 16 over 65536, theta 160000) with transformers' attention factor 1."""
    cfg = transformers.DeepseekV4Config(**{k: v for k, v in FLASH.items() if k != "architectures"})
    rotary = transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 127, 4096, 65535, 69999]])
    cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), positions, layer_type=kind)
    model = Transformer.__new__(Transformer)  # only the RoPE tables: no 43-layer module tree
    model.args, model._ropes = V4Args.from_config(FLASH), None
    cos, sin = model.ropes(70000, torch.device("cpu"))[kind]
    torch.testing.assert_close(cos[positions[0]], cos_hf[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[positions[0]], sin_hf[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["DeepseekV3ForCausalLM"]), "unsupported architecture"),
        (dict(compress_ratios=None), "missing 'compress_ratios'"),
        (dict(compress_ratios=[0, 4]), "compress_ratios has 2 entries for 43 layers"),
        (dict(hidden_size=None), "missing required key 'hidden_size'"),
        (dict(scoring_func="relu"), "unsupported scoring_func 'relu'"),
    ],
    ids=["architecture", "no_schedule", "short_schedule", "no_hidden_size", "scoring_func"],
)
def test_config_errors_name_the_file_and_field(change, message):
    config = {k: v for k, v in {**FLASH, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=f"^cfg.json: {message}"):
        V4Args.from_config(config, name="cfg.json")
