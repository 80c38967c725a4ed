"""`convert --recipe nvfp4 --format compressed-tensors` on DeepSeek-V4 (Flash, 0731 and Base layouts): the layout
vLLM's compressed-tensors path loads, read back by compressed_tensors' own decompression and by inspect --check."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from dsquant.check import check_checkpoint
from dsquant.checkpoint.names_v4 import keep_reason, scale_name
from dsquant.checkpoint.reader import Checkpoint
from dsquant.convert import convert
from dsquant.formats.ondisk import read_quantized
from tests.checkpoint.ct_reader import assert_groups_are_presets, decompress_each, load_like_the_library

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed in this env")

VARIANTS = ["flash", "flash-0731", "flash-base"]
EXPERT = ".ffn.experts."
# the router's tensors hang off ffn.gate beside its weight; the library's module tree leaves it out
NOT_LINEAR = ("ffn.gate",)


@pytest.fixture(scope="module")
def ct(synth_v4, tmp_path_factory):
    """ct(variant) -> (source path, output path), each converted once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            dst = tmp_path_factory.mktemp(f"v4ct-{variant}") / "out"
            convert(synth_v4(variant), dst, "nvfp4", convention="compressed-tensors", max_shard_size="2MB",
                    progress=False)
            cache[variant] = (synth_v4(variant), dst)
        return cache[variant]

    return get


def _source_linears(s: Checkpoint) -> list[str]:
    return sorted(n[: -len(".weight")] for n in s.infos if n.endswith(".weight") and scale_name(n) in s.infos)


def _values(ck: Checkpoint, module: str) -> torch.Tensor:
    return read_quantized(module, ck, ck.quantization_config).dequantize(torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_v4_ct_is_read_by_compressed_tensors(ct, variant):
    """The library parses the config (its presets' arguments), decompresses every quantized linear to dsquant's
    values, and loads the whole set of linears strictly with our targets and ignore list."""
    _, out = ct(variant)
    o = Checkpoint(out)
    qc = o.config["quantization_config"]
    assert_groups_are_presets(qc)
    quantized = sum(n.endswith(".weight_scale") for n in o.infos)
    assert decompress_each(o) == quantized > 0
    assert load_like_the_library(o, NOT_LINEAR) == quantized


@pytest.mark.parametrize("variant", VARIANTS)
def test_v4_ct_keeps_values_and_untouched_tensors(ct, variant):
    src, out = ct(variant)
    s, o = Checkpoint(src), Checkpoint(out)
    linears = _source_linears(s)
    dspark = variant == "flash-0731"
    for module in linears:
        p = module + "."
        if EXPERT not in module:  # FP8 bytes as stored, the grid as float32 with the same values
            assert o.raw(p + "weight") == s.raw(p + "weight"), module
            assert o.infos[p + "weight_scale"].dtype == torch.float32
            assert torch.equal(o.get(p + "weight_scale"), s.get(p + "scale").float()), module
        elif dspark and module.startswith("mtp."):  # kept MXFP4: the same bytes under compressed-tensors' names
            assert o.raw(p + "weight_packed") == s.raw(p + "weight") and o.raw(p + "weight_scale") == s.raw(p + "scale")
        else:
            assert o.infos[p + "weight_packed"].dtype == torch.uint8 and p + "weight_global_scale" in o.infos
            if variant != "flash-base":  # MXFP4 -> NVFP4 closed form: every synthetic block exact
                assert torch.equal(_values(o, module), _values(s, module)), module
            if module.endswith(".w1"):  # one fused GEMM1: w1 and w3 share both global scales
                w3 = module[:-2] + "w3."
                assert o.raw(p + "weight_global_scale") == o.raw(w3 + "weight_global_scale")
                assert o.raw(p + "input_global_scale") == o.raw(w3 + "input_global_scale")
    kept = [n for n in s.infos if not any(n in (m + ".weight", m + ".scale") for m in linears)]
    for name in kept:  # BF16 / F32 / I64 tensors, the compressor wkv / wgate and indexer weights_proj included
        assert o.raw(name) == s.raw(name), name
    assert any(keep_reason(n) and ".compressor.wkv." in n for n in kept)
    assert len(o.infos) == len(kept) + sum(2 if EXPERT not in m or (dspark and m.startswith("mtp.")) else 4
                                           for m in linears)


@pytest.mark.parametrize("variant", VARIANTS)
def test_v4_ct_config_and_check(ct, variant):
    src, out = ct(variant)
    cfg, qc = Checkpoint(out).config, Checkpoint(out).config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "expert_dtype" not in cfg
    assert not (out / "hf_quant_config.json").exists()
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
        {k: v for k, v in Checkpoint(src).config.items() if k not in ("quantization_config", "expert_dtype")}
    assert check_checkpoint(out) == []


def _group_format(qc: dict, name: str) -> str | None:
    """The format of the group whose `re:` target matches `name` as vLLM matches it (re.match), None if ignored or
    untargeted."""
    if any(re.match(i[3:], name) for i in qc["ignore"]):
        return None
    return next((g["format"] for g in qc["config_groups"].values() if any(re.match(t[3:], name) for t in g["targets"])),
                None)


def test_v4_ct_targets_name_the_modules_vllm_looks_up(ct):
    """vLLM asks CompressedTensorsConfig for the scheme of its own module names: `model.`-prefixed, fused attention
    and shared-expert linears, `<experts>.0.gate_proj` for a FusedMoE (compressed_tensors_moe.py get_moe_method);
    it never asks for the compressor and indexer weights_proj it builds unquantized, which stay ignored."""
    _, out = ct("flash")
    o = Checkpoint(out)
    qc = o.config["quantization_config"]
    layer = next(n.split(".")[1] for n in o.infos if ".attn.indexer.weights_proj." in n)
    p = f"model.layers.{layer}."
    assert {proj: _group_format(qc, p + "ffn.experts.0." + proj) for proj in ("gate_proj", "up_proj", "down_proj")} \
        == dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "nvfp4-pack-quantized")
    for fused in ("attn.fused_wqa_wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
                  "ffn.shared_experts.gate_up_proj", "ffn.shared_experts.down_proj"):
        assert _group_format(qc, p + fused) == "float-quantized", fused
    for kept in ("attn.compressor.fused_wkv_wgate", "attn.indexer.compressor.fused_wkv_wgate",
                 "attn.indexer.weights_proj", "ffn.gate"):
        assert _group_format(qc, p + kept) is None and any(re.match(i[3:], p + kept) for i in qc["ignore"]), kept


def _with_config(ct, tmp_path, edit) -> list:
    _, out = ct("flash")
    dst = tmp_path / "edited"
    shutil.copytree(out, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return [f for f in check_checkpoint(dst) if f.rule == "v4-ct-config"]


def _fp8_group(qc: dict) -> dict:
    return next(g for g in qc["config_groups"].values() if g["format"] == "float-quantized")


def test_v4_ct_check_flags_a_targeted_compressor(ct, tmp_path):
    def edit(qc):
        _fp8_group(qc)["targets"].append(r"re:.*\.compressor\.wkv$")
        qc["ignore"] = [i for i in qc["ignore"] if "compressor" not in i]

    found = _with_config(ct, tmp_path, edit)
    assert len(found) == 1 and found[0].severity == "error" and "compressor.wkv" in found[0].message
    assert "fused_wkv_wgate" in found[0].message


def test_v4_ct_check_flags_linears_without_their_group(ct, tmp_path):
    def edit(qc):
        _fp8_group(qc)["targets"] = [t for t in _fp8_group(qc)["targets"] if "wo_b" not in t]
        _fp8_group(qc)["format"] = "nvfp4-pack-quantized"

    found = _with_config(ct, tmp_path, edit)
    assert len(found) == 1 and "no config group" in found[0].message and "its group says" in found[0].message


def test_v4_formats_a_recipe_does_not_list_are_refused(synth_v4, tmp_path):
    with pytest.raises(ValueError, match="--format compressed-tensors: recipe v4-fp8-block writes DeepSeek-V4 in the "
                                         "official layout"):
        convert(synth_v4("flash"), tmp_path / "out", "fp8-block", convention="compressed-tensors", progress=False)
    assert not (tmp_path / "out").exists()


def test_v4_ct_cli_converts_and_refuses_in_one_line(synth_v4, tmp_path):
    from typer.testing import CliRunner

    from dsquant.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["convert", str(synth_v4("flash")), str(tmp_path / "fp8"), "--recipe", "fp8-block",
                                  "--format", "compressed-tensors"])
    assert refused.exit_code == 1 and refused.output.count("error:") == 1, refused.output
    assert "--format compressed-tensors: recipe v4-fp8-block" in refused.output and not (tmp_path / "fp8").exists()
    done = runner.invoke(app, ["convert", str(synth_v4("flash")), str(tmp_path / "ct"), "--recipe", "nvfp4",
                               "--format", "compressed-tensors"])
    assert done.exit_code == 0, done.output
    assert Checkpoint(tmp_path / "ct").config["quantization_config"]["quant_method"] == "compressed-tensors"
