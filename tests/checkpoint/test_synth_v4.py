"""The synthetic DeepSeek-V4 generator writes the official layout (deepseek-v4.md 1.3-1.8) with meaningful values,
and transformers 5.25, an independent reader, loads every variant to the values the stored bytes and scales say."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dsquant.checkpoint.names_v4 import blocks, is_v4, official_name, transformers_names
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.synth_v4 import V4_VARIANTS, make_synthetic_v4_checkpoint
from dsquant.formats.ondisk import read_quantized
from tests.checkpoint.v4_transformers import load_official, save_transformers_namespace

E8M0, F32, I8, FP8 = torch.float8_e8m0fnu, torch.float32, torch.int8, torch.float8_e4m3fn


def test_flash_layout_names_dtypes_shapes(synth_v4):
    ck = Checkpoint(synth_v4("flash"))
    c, info = ck.config, ck.infos
    d, v, i = c["hidden_size"], c["vocab_size"], c["moe_intermediate_size"]
    assert not any(n.startswith("model.") or "weight_scale_inv" in n for n in info)
    assert (info["embed.weight"].dtype, info["embed.weight"].shape) == (torch.bfloat16, (v, d))
    assert info["head.weight"].shape == (v, d) and info["hc_head_fn"].shape == (c["hc_mult"], c["hc_mult"] * d)
    # routed experts: FP4 packed two a byte in I8 [N, K/2], one E8M0 per 32 along K
    w1, w1s = info["layers.3.ffn.experts.0.w1.weight"], info["layers.3.ffn.experts.0.w1.scale"]
    assert (w1.dtype, w1.shape, w1s.dtype, w1s.shape) == (I8, (i, d // 2), E8M0, (i, d // 32))
    w2s = info["layers.3.ffn.experts.0.w2.scale"]
    assert info["layers.3.ffn.experts.0.w2.weight"].shape == (d, i // 2) and w2s.shape == (d, i // 32)
    # dense FP8 with E8M0 128x128 grids
    wq_b, wq_b_s = info["layers.0.attn.wq_b.weight"], info["layers.0.attn.wq_b.scale"]
    assert (wq_b.dtype, wq_b_s.dtype) == (FP8, E8M0) and wq_b_s.shape == (wq_b.shape[0] // 128, wq_b.shape[1] // 128)
    assert info["layers.0.attn.wo_a.weight"].shape == (c["o_groups"] * c["o_lora_rank"],
                                                       c["num_attention_heads"] * c["head_dim"] // c["o_groups"])
    for name in ("layers.0.hc_attn_fn", "layers.0.attn.attn_sink", "layers.2.attn.compressor.ape",
                 "layers.3.ffn.gate.bias", "mtp.0.hc_head_scale"):
        assert info[name].dtype == F32, name
    # hash layers route by token id (I64), the others have the F32 correction bias
    hash_layers = [li for li in range(c["num_hidden_layers"]) if f"layers.{li}.ffn.gate.tid2eid" in info]
    assert hash_layers == list(range(c["num_hash_layers"]))
    assert info["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert info["layers.0.ffn.gate.tid2eid"].shape == (v, c["num_experts_per_tok"])
    # compressors and indexers where compress_ratios says: 4 -> compressor (2x head dim wide) + indexer,
    # 128 -> compressor
    for li, ratio in enumerate(c["compress_ratios"][: c["num_hidden_layers"]]):
        p = f"layers.{li}.attn."
        assert (p + "compressor.ape" in info) == (ratio > 0), li
        assert (p + "indexer.weights_proj.weight" in info) == (ratio == 4), li
        if ratio:
            width = c["head_dim"] * (2 if ratio == 4 else 1)
            assert info[p + "compressor.ape"].shape == (ratio, width)
            assert info[p + "compressor.wkv.weight"].dtype == torch.bfloat16
            assert p + "compressor.wkv.scale" not in info
    assert info["layers.2.attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    assert info["layers.2.attn.indexer.wq_b.scale"].dtype == E8M0
    # the 1-stage MTP draft of the first releases
    assert {n.split(".")[1] for n in info if n.startswith("mtp.")} == {"0"}
    for name in ("mtp.0.e_proj.scale", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.ffn.gate.bias"):
        assert name in info, name
    assert c["expert_dtype"] == "fp4" and c["quantization_config"]["scale_fmt"] == "ue8m0"
    assert len(c["compress_ratios"]) == c["num_hidden_layers"] + 1


def test_base_layout_fp8_experts_f32_scales(synth_v4):
    ck = Checkpoint(synth_v4("flash-base"))
    c, info = ck.config, ck.infos
    w1, w1s = info["layers.3.ffn.experts.0.w1.weight"], info["layers.3.ffn.experts.0.w1.scale"]
    assert (w1.dtype, w1.shape, w1s.dtype) == (FP8, (c["moe_intermediate_size"], c["hidden_size"]), F32)
    assert w1s.shape == (c["moe_intermediate_size"] // 128, c["hidden_size"] // 128)
    scales = {i.dtype for n, i in info.items() if n.endswith(".scale")}
    assert scales == {F32} and c["expert_dtype"] == "fp8"
    assert not any(i.dtype in (I8, E8M0) for i in info.values())


def test_0731_layout_dspark_draft(synth_v4):
    ck = Checkpoint(synth_v4("flash-0731"))
    c, info = ck.config, ck.infos
    d, n = c["hidden_size"], c["num_hidden_layers"]
    assert {n_.split(".")[1] for n_ in info if n_.startswith("mtp.")} == {"0", "1", "2"}
    assert len(c["compress_ratios"]) == n + 3 and c["dspark_target_layer_ids"] == [n - 3, n - 2, n - 1]
    main = info["mtp.0.main_proj.weight"]
    assert (main.dtype, main.shape, info["mtp.0.main_proj.scale"].dtype) == (FP8, (d, 3 * d), E8M0)
    assert "mtp.0.main_norm.weight" in info and "mtp.1.main_proj.weight" not in info
    rank = c["dspark_markov_rank"]
    assert info["mtp.2.markov_head.markov_w1.weight"].shape == (c["vocab_size"], rank)
    assert info["mtp.2.confidence_head.proj.weight"].shape == (1, d + rank)
    for last_only in ("norm.weight", "hc_head_fn", "markov_head.markov_w2.weight"):
        assert f"mtp.2.{last_only}" in info and f"mtp.0.{last_only}" not in info, last_only
    assert not any(re.search(r"\.(e_proj|h_proj|enorm|hnorm)\.", x) for x in info)  # no MTP inputs in DSpark
    assert info["mtp.1.ffn.experts.0.w2.weight"].dtype == I8 and info["mtp.1.ffn.gate.bias"].dtype == F32


# deepseek-v4.md 1.6: the keys of Flash's config.json, and what 0731 adds
FLASH_KEYS = """architectures model_type torch_dtype transformers_version vocab_size hidden_size num_hidden_layers
num_attention_heads num_key_value_heads head_dim qk_rope_head_dim q_lora_rank o_lora_rank o_groups
moe_intermediate_size n_routed_experts n_shared_experts num_experts_per_tok num_hash_layers scoring_func topk_method
norm_topk_prob routed_scaling_factor swiglu_limit hidden_act sliding_window compress_rope_theta rope_theta
rope_scaling max_position_embeddings index_n_heads index_head_dim index_topk hc_mult hc_sinkhorn_iters hc_eps
rms_norm_eps num_nextn_predict_layers expert_dtype quantization_config compress_ratios bos_token_id eos_token_id
tie_word_embeddings""".split()
DSPARK_KEYS = ["dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank"]


@pytest.mark.parametrize("variant", V4_VARIANTS)
def test_config_has_the_release_fields(synth_v4, variant):
    cfg = json.loads((synth_v4(variant) / "config.json").read_text())
    assert set(cfg) == set(FLASH_KEYS) | (set(DSPARK_KEYS) if variant == "flash-0731" else set())
    assert set(cfg["quantization_config"]) == {"quant_method", "fmt", "activation_scheme", "scale_fmt",
                                               "weight_block_size"}
    assert set(cfg["rope_scaling"]) == {"type", "factor", "original_max_position_embeddings", "beta_fast",
                                        "beta_slow"}


def test_shards_index_and_partners(synth_v4):
    path = synth_v4("flash")
    ck = Checkpoint(path)
    assert len(ck.files) >= 3
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in ck.infos.values())
    wm = ck.weight_map
    assert wm["layers.0.ffn.experts.0.w1.weight"] != wm["layers.0.ffn.experts.0.w3.weight"]
    assert wm["layers.0.ffn.experts.1.w2.weight"] != wm["layers.0.ffn.experts.1.w2.scale"]
    assert wm["layers.0.attn.wo_b.weight"] != wm["layers.0.attn.wo_b.scale"]


def test_same_seed_same_bytes(tmp_path, synth_v4):
    again = make_synthetic_v4_checkpoint(tmp_path / "again", variant="flash")
    other = make_synthetic_v4_checkpoint(tmp_path / "other", variant="flash", seed=1)
    ref = synth_v4("flash")
    for f in sorted(p.name for p in ref.glob("*.safetensors")):
        assert (again / f).read_bytes() == (ref / f).read_bytes(), f
    first = "model-00001-of-00004.safetensors"
    assert (other / first).read_bytes() != (ref / first).read_bytes()


def test_unknown_override_and_variant_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        make_synthetic_v4_checkpoint(tmp_path / "x", hiden_size=128)
    with pytest.raises(ValueError, match="unknown synthetic V4 variant"):
        make_synthetic_v4_checkpoint(tmp_path / "y", variant="flash-0813")


@pytest.mark.parametrize("variant", V4_VARIANTS)
def test_scales_are_tight(synth_v4, variant):
    """The stored scales are what a correct quantizer picks: each FP8 block's largest code is at least 224 (the scale
    is the smallest power of two keeping the block within 448), and each FP4 group's largest code is 4 or 6 (the
    OCP exponent rule puts the group amax in [4, 8), clipped to 6)."""
    ck = Checkpoint(synth_v4(variant))
    for name, info in ck.infos.items():
        if info.dtype == FP8:
            q = ck.get(name).float().abs()
            blocks = q.reshape(q.shape[0] // 128, 128, q.shape[1] // 128, 128).amax(dim=(1, 3))
            assert bool(((blocks >= 224) & (blocks <= 448)).all()), name
        elif info.dtype == I8:
            qw = read_quantized(name[: -len(".weight")], ck, ck.quantization_config)
            codes = qw.dequantize(torch.float32) / torch.repeat_interleave(
                qw.scale.view(E8M0).float(), 32, dim=1)
            amax = codes.abs().reshape(codes.shape[0], -1, 32).amax(dim=-1)
            assert bool(((amax == 4) | (amax == 6)).all()), name


def _hf_name(official: str) -> str:
    """The transformers parameter an official tensor loads into (conversion_mapping "deepseek_v4", read from its
    documentation in deepseek-v4.md 2.1 and 2.4), experts by their merged parameter."""
    n = official
    for old, new in ((r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."),
                     (r"\.indexer\.compressor\.", ".compressor.indexer."), (r"^embed\.weight", "embed_tokens.weight"),
                     (r"^head\.weight", "lm_head.weight"), (r"^hc_head_(fn|base|scale)", r"hc_head.hc_\1"),
                     (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
                     (r"\.hc_(attn|ffn)_(fn|base|scale)", r".\1_hc.\2"), (r"\.attn_sink", ".sinks"),
                     (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
                     (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."),
                     (r"\.ape$", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."), (r"\.wq_b\.", ".q_b_proj."),
                     (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
                     (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."),
                     (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
                     (r"shared_experts\.w1\.", "shared_experts.gate_proj."),
                     (r"shared_experts\.w2\.", "shared_experts.down_proj."),
                     (r"shared_experts\.w3\.", "shared_experts.up_proj."),
                     (r"experts\.\d+\.w[13]\.weight$", "experts.gate_up_proj"),
                     (r"experts\.\d+\.w2\.weight$", "experts.down_proj")):
        n = re.sub(old, new, n)
    return n if n == "lm_head.weight" else "model." + n


def _dequantized(ck: Checkpoint, name: str) -> torch.Tensor:
    """dsquant's reading of one stored tensor: dequantized to BF16 when it has a scale, else as stored."""
    module = name[: -len(".weight")]
    if name.endswith(".weight") and module + ".scale" in ck:
        return read_quantized(module, ck, ck.quantization_config).dequantize(torch.bfloat16)
    return ck.get(name)


@pytest.mark.parametrize("variant", V4_VARIANTS)
def test_transformers_loads_official_layout_to_the_same_values(synth_v4, variant):
    """transformers maps every official name itself and dequantizes FP8 (E8M0 or F32 grids) and packed FP4 on
    CPU; each parameter it holds equals dsquant's dequantization of the stored bytes, bit for bit (both compute
    code * scale in float32 and round once to BF16). MTP / DSpark are dropped by transformers by design."""
    path = synth_v4(variant)
    model, info = load_official(path)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    ck = Checkpoint(path)
    state = model.state_dict()
    seen = set()
    experts: dict[str, dict] = {}
    for name in ck.infos:
        if name.endswith(".scale") or name.startswith("mtp."):
            continue
        hf = _hf_name(name)
        seen.add(hf)
        value = _dequantized(ck, name)
        m = re.search(r"experts\.(\d+)\.(w[123])\.weight$", name)
        if m:  # merged: gate_up_proj[e] = [w1; w3], down_proj[e] = w2
            experts.setdefault(hf, {})[(int(m.group(1)), m.group(2))] = value
            continue
        got = state[hf]
        assert torch.equal(got.to(value.dtype) if got.dtype != value.dtype else got, value), name
        if got.dtype != value.dtype:  # norms are upcast to float32 by transformers: exactly
            assert got.dtype == F32 and torch.equal(got, value.float()), name
    for hf, parts in experts.items():
        n_exp = 1 + max(e for e, _ in parts)
        if hf.endswith("gate_up_proj"):
            want = torch.stack([torch.cat([parts[(e, "w1")], parts[(e, "w3")]]) for e in range(n_exp)])
        else:
            want = torch.stack([parts[(e, "w2")] for e in range(n_exp)])
        assert torch.equal(state[hf], want), hf
    buffers = {n for n, _ in model.named_buffers()}
    assert set(state) - seen <= buffers, sorted(set(state) - seen - buffers)[:5]
    logits = model(torch.tensor([[0, 5, 9, 77, 3, 100]])).logits
    assert logits.shape == (1, 6, ck.config["vocab_size"]) and bool(torch.isfinite(logits).all())


def test_transformers_save_pretrained_writes_its_mixed_namespace(synth_v4, tmp_path):
    """What transformers 5.25 writes back (the fixture for readers of that namespace): deepseek-v4.md 2.3."""
    out = save_transformers_namespace(synth_v4("flash"), tmp_path / "tf")
    from safetensors import safe_open

    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert {"head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.hc_head.hc_fn"} <= names
    assert "model.layers.0.attn.norm.weight" in names and "model.layers.0.attn.wq_a.weight" in names
    assert "model.layers.0.ffn.experts.0.w1.weight" in names
    assert not any(n.startswith("mtp.") or n.endswith(".scale") for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "compress_ratios" not in cfg and "layer_types" in cfg
    # dsquant recognises the family and every name but the one transformers writes back officially, and reads the
    # layer kinds from the layer_types / mlp_layer_types transformers writes in place of DeepSeek's keys
    assert is_v4(cfg) and names - set(transformers_names(names)) == {"head.weight"}
    assert blocks(cfg) == blocks(json.loads((synth_v4("flash") / "config.json").read_text()))
    # and maps every name back to the official one
    official = {n for n in Checkpoint(synth_v4("flash")).infos if not n.endswith(".scale") and not n.startswith("mtp.")}
    assert {official_name(n) for n in names} == official
    assert all(official_name(n) == n for n in official)
