"""The synthetic checkpoint generator writes DeepSeek's exact names, dtypes and shapes (formats.md section 1.2)."""

from __future__ import annotations

import json

import pytest
import torch

from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.synth import make_synthetic_checkpoint


def _dims(cfg):
    heads = cfg["num_attention_heads"]
    return cfg["hidden_size"], heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]), heads


@pytest.mark.parametrize("variant", ["v3", "v3.2", "v2-lite", "kimi-k2"])
def test_synth_names_dtypes_shapes(synth, variant):
    ckpt = Checkpoint(synth(variant, "bf16"))
    cfg = ckpt.config
    h, qdim, heads = _dims(cfg)
    info = ckpt.infos
    assert info["model.embed_tokens.weight"].shape == (cfg["vocab_size"], h)
    assert info["lm_head.weight"].dtype == torch.bfloat16
    kv_a = info["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.shape == (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h) and kv_a.shape[0] % 128 == 64  # ragged
    assert info["model.layers.0.self_attn.kv_b_proj.weight"].shape == (heads * 256, cfg["kv_lora_rank"])
    assert info["model.layers.0.self_attn.o_proj.weight"].shape == (h, heads * cfg["v_head_dim"])
    if variant == "v2-lite":
        assert cfg["q_lora_rank"] is None and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
        assert info["model.layers.0.self_attn.q_proj.weight"].shape == (qdim, h)
        assert not any("q_a_proj" in n for n in info)
        assert "model.layers.1.mlp.gate.e_score_correction_bias" not in info  # softmax greedy router: no bias
        assert not any(n.startswith(f"model.layers.{cfg['num_hidden_layers']}.") for n in info)  # no MTP
    else:
        assert info["model.layers.0.self_attn.q_b_proj.weight"].shape == (qdim, cfg["q_lora_rank"])
        bias = info["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.shape == (cfg["n_routed_experts"],)
        mtp = cfg["num_hidden_layers"]
        for leaf in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head"):
            assert f"model.layers.{mtp}.{leaf}.weight" in info, leaf
        assert info[f"model.layers.{mtp}.eh_proj.weight"].shape == (h, 2 * h)
        assert f"model.layers.{mtp}.mlp.experts.0.gate_proj.weight" in info
    assert info["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    e = cfg["n_routed_experts"]
    inter = cfg["moe_intermediate_size"]
    assert info[f"model.layers.1.mlp.experts.{e - 1}.down_proj.weight"].shape == (h, inter)
    shared = info["model.layers.1.mlp.shared_experts.up_proj.weight"].shape
    assert shared == (inter * cfg["n_shared_experts"], h)
    assert info["model.layers.0.mlp.gate_proj.weight"].shape == (cfg["intermediate_size"], h)  # dense first layer
    if variant == "v3.2":
        assert info["model.layers.0.self_attn.indexer.wk.weight"].shape == (cfg["index_head_dim"], h)
        assert info["model.layers.0.self_attn.indexer.k_norm.bias"].dtype == torch.bfloat16
    if variant == "kimi-k2":
        assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]


@pytest.mark.parametrize("source", ["fp8", "fp8-ue8m0"])
def test_synth_fp8_source_has_block_scales(synth, source):
    ckpt = Checkpoint(synth("v3", source))
    qc = ckpt.config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert (qc.get("scale_fmt") == "ue8m0") == (source == "fp8-ue8m0")
    for name, info in ckpt.infos.items():
        if info.dtype == torch.float8_e4m3fn:
            scale = ckpt.infos[name + "_scale_inv"]
            assert scale.dtype == torch.float32
            assert scale.shape == (-(-info.shape[0] // 128), -(-info.shape[1] // 128)), name
            if source == "fp8-ue8m0":
                s = ckpt.get(name + "_scale_inv")
                assert torch.equal(s, torch.exp2(torch.log2(s).round())), f"{name}: scale not a power of two"
    for kept in ("lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.3.eh_proj.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert ckpt.infos[kept].dtype == torch.bfloat16, kept


def test_synth_splits_partners_across_shards(synth):
    ckpt = Checkpoint(synth("v3", "fp8"))
    where = ckpt.weight_map
    for a, b in [("layers.1.mlp.experts.0.gate_proj.weight", "layers.1.mlp.experts.0.up_proj.weight"),
                 ("layers.0.self_attn.q_a_proj.weight", "layers.0.self_attn.kv_a_proj_with_mqa.weight"),
                 ("layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.weight_scale_inv")]:
        assert where[f"model.{a}"] != where[f"model.{b}"], (a, b)
    assert len(set(where.values())) == 3


def test_synth_is_deterministic_and_checks_overrides(tmp_path):
    a = make_synthetic_checkpoint(tmp_path / "a", num_shards=2, n_routed_experts=2)
    b = make_synthetic_checkpoint(tmp_path / "b", num_shards=2, n_routed_experts=2)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    with pytest.raises(ValueError, match="unknown config keys"):
        make_synthetic_checkpoint(tmp_path / "c", hiden_size=64)
    with pytest.raises(ValueError, match="unknown synthetic variant"):
        make_synthetic_checkpoint(tmp_path / "d", variant="v4")


def test_synth_copies_tokenizer_and_generation_config(synth):
    path = synth("v3", "bf16")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "DeepSeek wörks"
    assert tok.decode(tok.encode(text).ids) == text
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 1

