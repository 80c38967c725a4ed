"""The V4 tensor inventory that dsquant derives from config.json reproduces the published inventories of the real
releases (deepseek-v4.md 1.3 and 1.8, counted from the Hub index files), and the family / namespace detection."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from dsquant.checkpoint.index import ST_DTYPE_BYTES
from dsquant.checkpoint.names_v4 import (
    blocks,
    expected_tensors,
    is_v4,
    keep_reason,
    official_name,
    stored_tensors,
    transformers_names,
)
from dsquant.checkpoint.synth import variant_config
from dsquant.checkpoint.synth_v4 import V4_VARIANTS, v4_config
from tests.checkpoint.v4_releases import FLASH, FLASH_0731, PRO


def _bytes(config) -> int:
    return sum(ST_DTYPE_BYTES[dtype] * math.prod(shape) for spec in expected_tensors(config)
               for _, dtype, shape in stored_tensors(spec, config["expert_dtype"]))


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


@pytest.mark.parametrize("config,gigabytes", [(FLASH, 159.6), (FLASH_0731, 166.9), (PRO, 864.7)])
def test_inventories_weigh_what_the_releases_weigh(config, gigabytes):
    assert round(_bytes(config) / 1e9, 1) == gigabytes


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
    names = [n for spec in expected_tensors(FLASH_0731) for n, _, _ in stored_tensors(spec, "fp4")]
    assert transformers_names(names) == []
    assert [official_name(n) for n in names] == names


def test_official_name_reverses_what_transformers_saves():
    assert official_name("model.embed_tokens.weight") == "embed.weight"
    assert official_name("head.weight") == "head.weight" and official_name("model.norm.weight") == "norm.weight"
    assert official_name("model.hc_head.hc_scale") == "hc_head_scale"
    assert official_name("model.layers.2.attn.norm.weight") == "layers.2.attn.kv_norm.weight"
    assert official_name("model.layers.2.attn.compressor.norm.weight") == "layers.2.attn.compressor.norm.weight"
    assert official_name("layers.0.attn.wq_a.scale") == "layers.0.attn.wq_a.scale"
    with pytest.raises(ValueError, match="no official DeepSeek-V4 counterpart"):
        official_name("model.layers.0.self_attn.q_a_proj.weight")
