"""Ground truth: on the same weights, the runner's logits match transformers' DeepseekV3ForCausalLM (CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dsquant.runner.load import load_model

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16}


def _hf_model(q_lora_rank, rope_scaling, seed=0, rope_theta=10000.0):
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
        rope_scaling=rope_scaling, max_position_embeddings=640, initializer_range=0.15, rope_theta=rope_theta,
    )
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and router bias, so their wiring is tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.1 * torch.randn_like(mod.e_score_correction_bias))
    return cfg, model


def _save_as_checkpoint(cfg, model, path):
    """Write the HF model with the on-disk (per-expert) tensor names DeepSeek checkpoints use."""
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                sd[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                sd[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                sd[f"{name[: -len('down_proj')]}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            sd[name] = t.contiguous()
    save_file(sd, str(path / "model.safetensors"))
    model.save_pretrained(path / "hf")  # config.json exactly as transformers writes it (rope_parameters, dtype)
    (path / "config.json").write_text((path / "hf" / "config.json").read_text())


@pytest.mark.parametrize("q_lora_rank,rope_theta", [(32, 10000.0), (None, 50000.0)], ids=["q_lora", "no_q_lora"])
@pytest.mark.parametrize("rope_scaling", [YARN, None], ids=["yarn", "plain_rope"])
def test_logits_match_transformers(tmp_path, q_lora_rank, rope_scaling, rope_theta):
    cfg, hf = _hf_model(q_lora_rank, rope_scaling, rope_theta=rope_theta)
    _save_as_checkpoint(cfg, hf, tmp_path)
    ours, _ = load_model(tmp_path, impl="reference", dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        actual = ours(tokens)
    # Both run in float32; the absorbed MLA reassociates the kv_b_proj products, so differences are
    # float32 rounding (~1e-6 relative). 1e-4 absolute on logits of std ~1 leaves room only for that.
    assert expected.std() > 0.3, "random weights too small to make the comparison meaningful"
    err = (actual - expected).abs().max().item()
    assert err < 1e-4, f"max |logit diff| = {err:.3e}"
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
