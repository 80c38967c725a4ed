"""--check rules on a checkpoint's structure and config files: a hand-made checkpoint that breaks each rule, and
the unbroken checkpoints that pass. Fixtures: tests/check/ckpt_factory.py, written from formats.md, not by dsquant's
converter, so the rules are tested on checkpoints "made by any tool"."""

from __future__ import annotations

import json

import pytest

from dsquant.check import check_checkpoint
from dsquant.checkpoint.index import CheckpointError
from tests.check.check_helpers import KINDS, hits, only, run
from tests.check.ckpt_factory import build


@pytest.mark.parametrize("kind", KINDS)
def test_well_formed_checkpoints_pass(tmp_path, kind):
    assert run(tmp_path, build(kind)) == []


# --- structure --------------------------------------------------------------------------------------


def test_missing_shard_is_an_error(tmp_path):
    path = build("modelopt").write(tmp_path / "c")
    (path / "model-00002-of-00002.safetensors").unlink()
    f = only(check_checkpoint(path), "index")
    assert f.file == "model-00002-of-00002.safetensors" and "missing" in f.message


def test_corrupt_header_is_an_error(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:64])
    f = only(check_checkpoint(path), "index")
    assert f.file == shard.name and "header" in f.message


def test_truncated_shard_is_an_error(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert any("past the end" in f.message for f in hits(check_checkpoint(path), "index"))


def test_index_entry_not_in_its_shard_and_stray_tensor(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    moved = "lm_head.weight"
    wrong = "model-00002-of-00002.safetensors" if index["weight_map"][moved].startswith("model-00001") else \
        "model-00001-of-00002.safetensors"
    index["weight_map"][moved] = wrong
    stray = next(n for n in index["weight_map"] if n != moved)
    del index["weight_map"][stray]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    fs = hits(check_checkpoint(path), "index")
    assert {f.tensor for f in fs} == {moved, stray}, [str(f) for f in fs]


def test_index_naming_a_file_outside_the_checkpoint(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../x.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any(f.file == "../x.safetensors" and "outside" in f.message for f in hits(check_checkpoint(path), "index"))


def test_total_size_and_unlisted_shard_are_warnings(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 2
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "model-00009-of-00009.safetensors").write_bytes((path / "model-00001-of-00002.safetensors").read_bytes())
    fs = check_checkpoint(path)
    assert only(fs, "index-total-size", "warning").file == "model.safetensors.index.json"
    assert only(fs, "unlisted-shard", "warning").file == "model-00009-of-00009.safetensors"
    assert not [f for f in fs if f.severity == "error"]


def test_config_layer_and_expert_counts_must_match_tensors(tmp_path):
    ck = build("bf16")
    ck.config["num_hidden_layers"] = 1  # layer 1 now looks like the MTP layer and layer 2 is beyond it
    ck.config["n_routed_experts"] = 8
    fs = hits(run(tmp_path, ck), "layers")
    assert any("beyond" in f.message for f in fs) and any("n_routed_experts=8" in f.message for f in fs)


def test_not_a_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        check_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        check_checkpoint(tmp_path / "empty")
    path = build("bf16").write(tmp_path / "c")
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        check_checkpoint(path)


# --- config files -----------------------------------------------------------------------------------


def test_missing_config_and_unknown_architecture(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    (path / "config.json").unlink()
    assert only(check_checkpoint(path), "config-missing").file == "config.json"
    ck = build("bf16")
    ck.config["architectures"] = ["LlamaForCausalLM"]
    assert only(run(tmp_path, ck), "not-deepseek", "warning")


def test_missing_tokenizer_is_a_warning(tmp_path):
    ck = build("bf16")
    ck.extra_files = {}
    assert "tokenizer" in only(run(tmp_path, ck), "tokenizer-missing", "warning").message


def test_stale_fp8_config_beside_nvfp4_tensors(tmp_path):
    ck = build("ct-nvfp4")
    ck.config["quantization_config"] = build("deepseek-fp8").config["quantization_config"]
    f = only(run(tmp_path, ck), "stale-quant-config")
    assert "['fp8']" in f.message and "nvfp4" in f.message


def test_config_json_disagrees_with_hf_quant_config(tmp_path):
    ck = build("modelopt")
    ck.config["quantization_config"] = build("deepseek-fp8").config["quantization_config"]
    fs = hits(run(tmp_path, ck), "stale-quant-config")
    assert any("hf_quant_config.json declares ModelOpt" in f.message for f in fs)
    ck = build("modelopt")
    ck.config["quantization_config"]["quant_algo"] = "FP8"
    assert any("quant_algo 'FP8'" in f.message for f in hits(run(tmp_path / "b", ck), "stale-quant-config"))


def test_quantized_tensors_without_any_config_and_config_without_quantized_tensors(tmp_path):
    ck = build("ct-int8")
    del ck.config["quantization_config"]
    assert "int8" in only(run(tmp_path, ck), "missing-quant-config").message
    ck = build("bf16")
    ck.config["quantization_config"] = build("deepseek-fp8").config["quantization_config"]
    assert "no tensor is stored quantized" in only(run(tmp_path / "b", ck), "missing-quant-config").message


@pytest.mark.parametrize("key", ["quant_algo", "group_size", "kv_cache_quant_algo", "exclude_modules"])
def test_hf_quant_config_required_keys(tmp_path, key):
    ck = build("modelopt")
    del ck.hf_quant_config["quantization"][key]
    fs = hits(run(tmp_path, ck), "hf-quant-config-keys")
    assert any(key in f.message and f.file == "hf_quant_config.json" for f in fs), [str(f) for f in fs]


def test_hf_quant_config_empty_exclude_and_null_kv(tmp_path):
    ck = build("modelopt")
    ck.hf_quant_config["quantization"]["exclude_modules"] = []
    ck.hf_quant_config["quantization"]["kv_cache_quant_algo"] = None
    fs = run(tmp_path, ck)
    assert "exclude_modules is empty" in only(fs, "hf-quant-config-keys").message
    assert "null" in only(fs, "hf-quant-config-keys", "warning").message


def test_fp8_config_keys(tmp_path):
    ck = build("deepseek-fp8")
    del ck.config["quantization_config"]["activation_scheme"]
    del ck.config["quantization_config"]["weight_block_size"]
    fs = hits(run(tmp_path, ck), "quant-config-keys")
    assert {("activation_scheme" in f.message) for f in fs} == {True, False} and len(fs) == 2
    ck = build("ct-int8")
    ck.config["quantization_config"]["config_groups"] = {}
    assert "config_groups" in only(run(tmp_path / "b", ck), "quant-config-keys").message
