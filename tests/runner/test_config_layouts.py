"""config.json as transformers 4 and 5 write it: the runner reads RoPE and dtype from either layout, and refuses
a config whose two layouts disagree. Layouts come from transformers' own save_pretrained, not from dsquant."""

from __future__ import annotations

import json

import pytest
import torch

from dsquant.runner.config import ModelArgs

transformers = pytest.importorskip("transformers")

# Kimi-K2's shipped rope settings (top-level rope_theta 50000 beside a YaRN rope_scaling).
KIMI_YARN = {"type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}


def _saved(tmp_path, **kw) -> dict:
    """config.json written by transformers' DeepseekV3Config.save_pretrained."""
    cfg = transformers.DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
                                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                        **kw)
    cfg.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_transformers5_rope_parameters_yarn(tmp_path):
    config = _saved(tmp_path, rope_theta=50000.0, rope_scaling=dict(KIMI_YARN), max_position_embeddings=131072)
    assert "rope_parameters" in config and "rope_theta" not in config, "transformers 5 layout expected"
    args = ModelArgs.from_config(config)
    assert args.rope_theta == 50000.0
    assert args.rope_scaling["type"] == "yarn"
    for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings"):
        assert args.rope_scaling[key] == KIMI_YARN[key], key


def test_both_layouts_read_the_same(tmp_path):
    """The legacy top-level layout (Kimi-K2, DeepSeek-V3 as shipped) and transformers 5's layout give one ModelArgs."""
    new = _saved(tmp_path, rope_theta=50000.0, rope_scaling=dict(KIMI_YARN))
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=50000.0, rope_scaling=dict(KIMI_YARN), torch_dtype="bfloat16")
    a, b = ModelArgs.from_config(new), ModelArgs.from_config(old)
    assert (a.rope_theta, a.softmax_scale) == (b.rope_theta, b.softmax_scale)
    assert {k: a.rope_scaling[k] for k in KIMI_YARN} == {k: b.rope_scaling[k] for k in KIMI_YARN}


def test_plain_rope_theta_in_rope_parameters(tmp_path):
    config = _saved(tmp_path, rope_theta=50000.0)
    args = ModelArgs.from_config(config)
    assert (args.rope_theta, args.rope_scaling) == (50000.0, None)


def test_model_save_pretrained_dtype(tmp_path):
    cfg = transformers.DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=4, n_routed_experts=4,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
                                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert ModelArgs.from_config(config).dtype == "bfloat16"
    assert ModelArgs.from_config({**config, "torch_dtype": "bfloat16"}).dtype == "bfloat16"


@pytest.mark.parametrize("change,field", [
    (lambda c: c.update(rope_theta=10000.0), "rope_theta"),
    (lambda c: c.update(rope_scaling={**KIMI_YARN, "factor": 4.0}), "factor"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 32.0}), "type"),
    (lambda c: c.update(torch_dtype="float16"), "disagrees with torch_dtype"),
], ids=["theta", "yarn_factor", "rope_type", "dtype"])
def test_disagreeing_layouts_refused(tmp_path, change, field):
    config = _saved(tmp_path, rope_theta=50000.0, rope_scaling=dict(KIMI_YARN))
    config["dtype"] = "bfloat16"
    change(config)
    with pytest.raises(ValueError, match=rf"cfg\.json: .*{field}"):
        ModelArgs.from_config(config, name="cfg.json")


def test_rope_type_the_runner_cannot_compute_is_refused(tmp_path):
    config = _saved(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE type 'linear'"):
        ModelArgs.from_config(config)


def test_eval_cli_refuses_disagreeing_rope_layouts(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from dsquant.cli import app
    from dsquant.demo import ASSET_DIR

    dst = tmp_path / "demo"
    shutil.copytree(ASSET_DIR, dst)
    config = json.loads((dst / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", **config["rope_scaling"], "rope_theta": 50000.0}
    (dst / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["eval", str(dst), "--seq-len", "16", "--max-tokens", "64"])
    assert r.exit_code == 1, r.output
    assert "rope_theta 10000.0 disagrees with rope_parameters.rope_theta 50000.0" in r.output
    assert "Traceback" not in r.output
