"""Where convert gets its source: the demo model, hf:// specs through checkpoint.hub_source, and calibration input."""

from __future__ import annotations

import json

import pytest

import dsquant.demo as demo
from dsquant.checkpoint.reader import Checkpoint
from dsquant.convert import convert, parse_size


def test_demo_model_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ASSET_DIR", tmp_path / "no-bundled-model")
    monkeypatch.setenv("DSQUANT_CACHE", str(tmp_path / "cache"))
    first = demo.demo_model_dir()
    assert first.is_relative_to(tmp_path / "cache")
    ckpt = Checkpoint(first)
    assert ckpt.config["quantization_config"]["quant_method"] == "fp8"  # random-weight FP8 DeepSeek-V3
    stamp = (first / "config.json").stat().st_mtime_ns
    assert demo.demo_model_dir() == first and (first / "config.json").stat().st_mtime_ns == stamp  # reused
    assert not list(first.parent.glob(".build-*")), "the temporary build folder must be gone"


def test_convert_without_src_uses_the_demo_model(tmp_path, monkeypatch, synth):
    monkeypatch.setattr(demo, "demo_model_dir", lambda: synth("v3", "fp8"))
    summary = convert(None, tmp_path / "out", "fp8-block", progress=False)
    assert summary.src == str(synth("v3", "fp8")) and summary.source_dtype == "fp8"


def test_hf_source_goes_through_hub_source(tmp_path, monkeypatch, synth):
    import dsquant.checkpoint.hub_source as hub_source

    calls = []

    def fake_resolve(spec):
        calls.append(spec)
        return synth("v3", "bf16")

    monkeypatch.setattr(hub_source, "resolve_source", fake_resolve)
    monkeypatch.chdir(tmp_path)
    summary = convert("hf://deepseek-ai/DeepSeek-V3@abc123", None, "int8", progress=False)
    assert calls == ["hf://deepseek-ai/DeepSeek-V3@abc123"]
    assert summary.dst == str(tmp_path / "DeepSeek-V3-int8")
    source = json.loads((tmp_path / "DeepSeek-V3-int8" / "dsquant_recipe.json").read_text())["source"]
    assert source["repo_id"] == "deepseek-ai/DeepSeek-V3" and source["revision"] == "abc123"
    assert source["architectures"] == ["DeepseekV3ForCausalLM"] and source["dtype"] == "bf16"


def test_calibrated_input_scales_replace_the_default(tmp_path, synth):
    mod = "model.layers.1.mlp.experts.0"
    calib = {f"{mod}.gate_proj": 0.25, f"{mod}.up_proj": 0.5}
    convert(synth("v3", "bf16"), tmp_path / "out", "nvfp4", calibration=calib, progress=False)
    out = Checkpoint(tmp_path / "out")
    # fused partners take the larger of their two scales; others keep the recipe default (1.0)
    assert out.get(f"{mod}.gate_proj.input_scale").item() == 0.5 == out.get(f"{mod}.up_proj.input_scale").item()
    assert out.get("model.layers.1.mlp.experts.1.gate_proj.input_scale").item() == 1.0
    record = json.loads((tmp_path / "out" / "dsquant_recipe.json").read_text())
    assert record["activation_scales"] == "calibrated"
    with pytest.raises(ValueError, match="must be a positive finite number"):
        convert(synth("v3", "bf16"), tmp_path / "bad", "nvfp4", calibration={mod: float("nan")}, progress=False)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    assert parse_size("1.5 gb") == 1_500_000_000
    for bad in ("", "0GB", "5XB", "-1GB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
