"""The V4 tensor inventory that dsquant derives from config.json reproduces the published inventories of the real
releases (deepseek-v4.md 1.3 and 1.8, counted from the Hub index files), and the family / namespace detection."""

from __future__ import annotations

from collections import Counter

import pytest

from dsquant.checkpoint.names_v4 import (
    blocks,
    expected_tensors,
    is_v4,
    keep_reason,
    stored_tensors,
    transformers_names,
)
from dsquant.checkpoint.synth import variant_config
from dsquant.checkpoint.synth_v4 import V4_VARIANTS, v4_config

# config.json fields of the releases (deepseek-v4.md 1.6), only those the inventory depends on
FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024,
    "o_lora_rank": 1024, "o_groups": 8, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3, "index_n_heads": 64,
    "index_head_dim": 128, "hc_mult": 4, "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
}
FLASH_0731 = dict(FLASH, compress_ratios=FLASH["compress_ratios"][:43] + [0, 0, 0], dspark_block_size=5,
                  dspark_target_layer_ids=[40, 41, 42], dspark_markov_rank=256)
PRO = dict(FLASH, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
           n_routed_experts=384, moe_intermediate_size=3072, o_groups=16,
           compress_ratios=[128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0])


def _dtypes(config, prefix=""):
    counts = Counter()
    for spec in expected_tensors(config):
        for name, dtype, _ in stored_tensors(spec, config["expert_dtype"]):
            if name.startswith(prefix):
                counts[dtype] += 1
    return counts


def test_flash_inventory_is_the_published_one():
    counts = _dtypes(FLASH)
    assert sum(counts.values()) == 69187
    assert counts == {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34167, "I64": 3, "I8": 33792}
    per_block = Counter()
    for spec in expected_tensors(FLASH):
        for name, _, _ in stored_tensors(spec, "fp4"):
            per_block[".".join(name.split(".")[:2])] += 1
    assert per_block["layers.0"] == 1565  # sliding, hash routing
    assert per_block["layers.2"] == 1576 and per_block["layers.4"] == 1576  # CSA (hash / not)
    assert per_block["layers.3"] == 1569  # HCA
    assert per_block["mtp.0"] == 1575


def test_flash_0731_dspark_namespace_is_the_published_one():
    counts = _dtypes(FLASH_0731, "mtp.")
    assert counts == {"BF16": 20, "F32": 27, "F8_E4M3": 25, "F8_E8M0": 2329, "I8": 2304}
    assert sum(counts.values()) == 4705 and sum(_dtypes(FLASH_0731).values()) == 72317


def test_pro_inventory_has_the_published_size():
    assert sum(_dtypes(PRO).values()) == 145116


def test_base_stores_fp8_experts_with_f32_scales():
    counts = _dtypes(dict(FLASH, expert_dtype="fp8"))
    assert "I8" not in counts and "F8_E8M0" not in counts
    assert counts["F8_E4M3"] == 375 + 33792 and counts["F32"] == 417 + 375 + 33792


def test_block_kinds_from_config():
    kinds = {b.prefix: (b.attention, b.hash_routing, b.draft) for b in blocks(FLASH_0731)}
    assert kinds["layers.0"] == ("sliding", True, None) and kinds["layers.2"] == ("csa", True, None)
    assert kinds["layers.3"] == ("hca", False, None) and kinds["layers.42"] == ("csa", False, None)
    assert [k for k in kinds if k.startswith("mtp.")] == ["mtp.0", "mtp.1", "mtp.2"]
    assert kinds["mtp.2"] == ("sliding", False, "dspark")
    with pytest.raises(ValueError, match="compress_ratios must list one ratio per layer"):
        blocks(dict(FLASH, compress_ratios=[0, 4]))
    with pytest.raises(ValueError, match=r"compress_ratios holds \[8\]"):
        blocks(dict(FLASH, compress_ratios=[8] * 44))


def test_unquantized_tensors_are_exactly_the_non_linear_ones():
    for spec in expected_tensors(FLASH_0731):
        keep = keep_reason(spec.name)
        assert (keep is not None) == (spec.kind in ("bf16", "f32", "i64")), spec


def test_family_detection():
    for variant in V4_VARIANTS:
        assert is_v4(v4_config(variant))
    assert is_v4({"model_type": "deepseek_v4"}) and is_v4({"architectures": ["DeepseekV4ForCausalLM"]})
    for variant in ("v3", "v3.2", "v2-lite", "kimi-k2"):
        assert not is_v4(variant_config(variant))


def test_official_names_are_not_taken_for_the_transformers_namespace():
    assert transformers_names([s.name for s in expected_tensors(FLASH_0731)]) == []
