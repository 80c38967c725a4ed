"""--check on DeepSeek-V4 checkpoints: the official layouts pass, and a checkpoint that breaks one rule gets that
rule's finding, naming the tensor and what to do (dsquant/check/v4_*.py)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dsquant.check import check_checkpoint, check_view
from dsquant.checkpoint.index import TensorInfo
from dsquant.checkpoint.names_v4 import expected_tensors, stored_tensors
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.synth_v4 import V4_VARIANTS
from dsquant.cli import app
from dsquant.formats import quantize_fp8_block
from dsquant.inspect import format_summary, summarize_checkpoint, summarize_view
from tests.check.check_helpers import hits, only, run
from tests.check.ckpt_factory_v4 import build_v4, to_nvfp4_experts
from tests.checkpoint.v4_releases import FLASH

EXP = "layers.3.ffn.experts.0."


@pytest.mark.parametrize("variant", V4_VARIANTS)
def test_official_layouts_pass(tmp_path, variant):
    assert run(tmp_path, build_v4(variant), num_shards=3) == []


def test_full_size_flash_headers_pass(tmp_path):
    """The rules at the release's real dims (wo_a [8192, 4096], experts [2048, 4096] packed), from headers only."""
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
          "weight_block_size": [128, 128]}
    (tmp_path / "tokenizer.json").write_text("{}")
    view = Checkpoint.blank(tmp_path, config=dict(FLASH, quantization_config=qc))
    for spec in expected_tensors(view.config):
        for name, dtype, shape in stored_tensors(spec, "fp4"):
            view.infos[name] = TensorInfo(name, "model.safetensors", dtype, shape, 0, 0)
    assert check_view(view) == []
    assert summarize_view(view)["architecture"]["v4"]["attention"] == {"sliding": 2, "csa": 21, "hca": 20}


def test_nvidia_nvfp4_layout_passes_and_needs_moe_quant_algo(tmp_path):
    ck = build_v4("flash")
    to_nvfp4_experts(ck, prefix="")  # backbone and MTP experts
    assert run(tmp_path, ck) == []
    del ck.config["quantization_config"]["moe_quant_algo"]
    f = only(run(tmp_path / "b", ck), "v4-expert-dtype")
    assert "moe_quant_algo" in f.message and "NVFP4" in f.message


def test_nvfp4_experts_and_hf_quant_config(tmp_path):
    ck = build_v4("flash")
    to_nvfp4_experts(ck, prefix="")
    layers = ck.hf_quant_config["quantization"]["quantized_layers"]
    del layers[EXP + "w2"]
    layers["layers.0.attn.wq_a"] = {"quant_algo": "NVFP4", "group_size": 16}
    ck.hf_quant_config["quantization"]["exclude_modules"] = []
    got = sorted(f.message for f in hits(run(tmp_path, ck), "v4-hf-quant-config"))
    assert got == ["quantization.exclude_modules is missing or empty",
                   "quantized_layers lacks 1 stored NVFP4 module(s), e.g. layers.3.ffn.experts.0.w2",
                   "quantized_layers lists 1 module(s) as NVFP4 that are not stored NVFP4, e.g. layers.0.attn.wq_a"]
    ck.hf_quant_config = None
    assert "SGLang reads group_size" in only(run(tmp_path / "b", ck), "v4-hf-quant-config", "warning").message


def test_transformers_namespace_is_an_error_with_the_fix(tmp_path):
    from dsquant.checkpoint.synth_v4 import make_synthetic_v4_checkpoint
    from tests.checkpoint.v4_transformers import save_transformers_namespace

    src = make_synthetic_v4_checkpoint(tmp_path / "src", variant="flash-base")
    findings = check_checkpoint(save_transformers_namespace(src, tmp_path / "tf"))
    f = only(findings, "v4-namespace")
    assert f.tensor == "model.embed_tokens.weight" and "`dsquant convert" in f.message
    assert [x.rule for x in findings if x.severity == "error"] == ["v4-namespace"]


def test_config_that_cannot_describe_the_layers(tmp_path):
    ck = build_v4()
    ck.config["compress_ratios"] = [0, 0, 4]
    assert "compress_ratios must list one ratio per layer" in only(run(tmp_path, ck), "v4-config").message
    ck = build_v4()
    del ck.config["o_groups"]
    assert "field 'o_groups' is missing" in only(run(tmp_path / "b", ck), "v4-config").message


def test_missing_tensor(tmp_path):
    ck = build_v4()
    del ck.tensors["layers.2.attn.indexer.weights_proj.weight"]
    assert only(run(tmp_path, ck), "v4-missing").tensor == "layers.2.attn.indexer.weights_proj.weight"


def test_unexpected_tensors(tmp_path):
    ck = build_v4()
    ck.tensors["layers.0.attn.compressor.ape"] = torch.zeros(4, 256)  # layer 0 is sliding: no compressor
    ck.tensors["layers.1.ffn.gate.bias"] = torch.zeros(4)  # a hash layer routes by tid2eid
    f = only(run(tmp_path, ck), "v4-unexpected")
    assert f.message.startswith("2 stored tensor(s)") and f.tensor == "layers.0.attn.compressor.ape"


def test_dropped_draft_is_a_warning(tmp_path):
    ck = build_v4("flash-0731")
    ck.tensors = {n: t for n, t in ck.tensors.items() if not n.startswith("mtp.")}
    findings = run(tmp_path, ck)
    assert only(findings, "v4-draft-missing", "warning").tensor.startswith("mtp.0.")
    assert not hits(findings, "v4-missing")


def test_wrong_shape(tmp_path):
    ck = build_v4()
    q, s = quantize_fp8_block(torch.randn(256, 256))
    ck.tensors["layers.3.attn.wkv.weight"] = q
    ck.tensors["layers.3.attn.wkv.scale"] = s.to(torch.float8_e8m0fnu)
    f = only(run(tmp_path, ck), "v4-shape")
    assert f.tensor == "layers.3.attn.wkv.weight" and "[256, 256], config.json implies [128, 256]" in f.message


def test_fp8_experts_without_expert_dtype(tmp_path):
    ck = build_v4("flash-base")
    del ck.config["expert_dtype"]
    f = only(run(tmp_path, ck), "v4-expert-dtype")
    assert "no expert_dtype (vLLM assumes 'fp4')" in f.message and '"expert_dtype": "fp8"' in f.message


def test_fp4_experts_declared_fp8(tmp_path):
    ck = build_v4("flash")
    ck.config["expert_dtype"] = "fp8"
    findings = run(tmp_path, ck)
    assert '"expert_dtype": "fp4"' in only(findings, "v4-expert-dtype").message
    # the dense scales are E8M0, which vLLM reads as float32 when expert_dtype is fp8
    assert "expert_dtype 'fp8' makes vLLM load dense scales as F32" in only(findings, "v4-scale-dtype").message


def test_unsupported_expert_dtype(tmp_path):
    ck = build_v4()
    ck.config["expert_dtype"] = "fp6"
    assert "Unsupported DeepSeek V4 expert_dtype" in only(run(tmp_path, ck), "v4-expert-dtype").message


def test_experts_in_two_formats(tmp_path):
    ck = build_v4("flash")
    base = build_v4("flash-base")
    for p in ("w1", "w2", "w3"):
        for t in ("weight", "scale"):
            ck.tensors[f"{EXP}{p}.{t}"] = base.tensors[f"{EXP}{p}.{t}"]
    assert "several formats" in only(run(tmp_path, ck), "v4-expert-dtype").message


def test_draft_experts_in_another_format_is_a_warning(tmp_path):
    ck = build_v4("flash-0731")
    to_nvfp4_experts(ck, prefix="layers.")  # NVIDIA's 0731 NVFP4 keeps the DSpark experts MXFP4
    findings = run(tmp_path, ck)
    assert "draft experts are stored as ['mxfp4']" in only(findings, "v4-draft-experts", "warning").message
    assert not [f for f in findings if f.severity == "error"]


def test_dense_scale_dtype_must_follow_the_experts(tmp_path):
    ck = build_v4("flash")
    ck.tensors["layers.0.attn.wq_a.scale"] = ck.tensors["layers.0.attn.wq_a.scale"].float()
    f = only(run(tmp_path, ck), "v4-scale-dtype")
    assert f.tensor == "layers.0.attn.wq_a.scale" and "as F8_E8M0" in f.message
    base = build_v4("flash-base")
    base.tensors[EXP + "w2.scale"] = base.tensors[EXP + "w2.scale"].to(torch.float8_e8m0fnu)
    f = only(run(tmp_path / "b", base), "v4-scale-dtype")
    assert f.tensor == EXP + "w2.scale" and "Fp8MoEMethod" in f.message


def test_scale_grids(tmp_path):
    ck = build_v4("flash")
    ck.tensors[EXP + "w1.scale"] = ck.tensors[EXP + "w1.scale"].view(torch.uint8)[:, :4].contiguous().view(
        torch.float8_e8m0fnu)
    del ck.tensors["layers.1.attn.wo_b.scale"]
    f = only(run(tmp_path, ck), "v4-scale-grid")
    assert f"{EXP}w1.scale is [128, 4], expected [128, 8]" in f.message
    assert "layers.1.attn.wo_b.weight (F8_E4M3) has no .scale" in f.message


def test_tensors_that_must_stay_unquantized(tmp_path):
    ck = build_v4("flash")
    q, s = quantize_fp8_block(ck.tensors["layers.2.attn.compressor.wkv.weight"].float())
    ck.tensors["layers.2.attn.compressor.wkv.weight"] = q
    ck.tensors["layers.2.attn.compressor.wkv.scale"] = s
    ck.tensors["layers.0.hc_attn_fn"] = ck.tensors["layers.0.hc_attn_fn"].bfloat16()
    ck.tensors["layers.0.ffn.gate.tid2eid"] = ck.tensors["layers.0.ffn.gate.tid2eid"].int()
    findings = run(tmp_path, ck)
    err = only(findings, "v4-unquantized")
    assert "layers.2.attn.compressor.wkv.weight is stored quantized" in err.message and "fused_wkv_wgate" in err.message
    assert "layers.0.hc_attn_fn is BF16, the release stores F32" in err.message
    warn = only(findings, "v4-unquantized", "warning")
    assert warn.tensor == "layers.0.ffn.gate.tid2eid"


def test_bf16_linear_under_fp8_config(tmp_path):
    ck = build_v4("flash")
    del ck.tensors["layers.0.attn.wq_a.scale"]
    ck.tensors["layers.0.attn.wq_a.weight"] = torch.zeros(128, 256, dtype=torch.bfloat16)
    assert only(run(tmp_path, ck), "v4-quantized").tensor == "layers.0.attn.wq_a.weight"
    ck.config["quantization_config"]["ignored_layers"] = ["layers.0.attn.wq_a"]
    assert not hits(run(tmp_path / "b", ck), "v4-quantized")


def test_quantization_config(tmp_path):
    ck = build_v4()
    qc = ck.config["quantization_config"]
    qc.update(weight_block_size=[32, 32], activation_scheme="static")
    findings = hits(run(tmp_path, ck), "v4-quant-config")
    assert sorted(f.message.split(" is ")[0] for f in findings) == [
        "quantization_config: activation_scheme", "quantization_config: weight_block_size"]
    qc.update(weight_block_size=[128, 128], activation_scheme="dynamic", quant_method="modelopt")
    f = only(run(tmp_path / "m", ck), "v4-quant-config")
    assert "quant_method is 'modelopt'" in f.message and "DeepseekV4FP8Config" in f.message
    del ck.config["quantization_config"]
    f = only(run(tmp_path / "b", ck), "v4-quant-config")
    assert "no quantization_config" in f.message


def test_index_and_shards_disagree(tmp_path):
    path = build_v4().write(tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.0.attn.wq_a.scale"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    findings = check_checkpoint(path)
    assert any(f.rule == "index" and f.tensor == "layers.0.attn.wq_a.scale" for f in findings)


def test_tokenizer_missing(tmp_path):
    ck = build_v4()
    ck.extra_files = {}
    assert only(run(tmp_path, ck), "tokenizer-missing", "warning")


def test_inspect_summary_knows_v4(tmp_path):
    path = build_v4("flash-0731").write(tmp_path / "c")
    s = summarize_checkpoint(path)
    assert s["convention"] == "deepseek-v4-fp8" and s["consistency"]["ok"]
    a = s["architecture"]
    assert (a["layers_stored"], a["experts_stored"]) == (5, 4)
    assert a["v4"] == {"attention": {"sliding": 2, "csa": 2, "hca": 1}, "hash_layers": 3, "draft": "dspark",
                       "draft_stages": 3, "expert_dtype": "fp4"}
    groups = {g["group"]: g["formats"] for g in s["groups"]}
    assert groups["routed experts"] == {"mxfp4": 60} and groups["compressor"] == {"bf16": 9, "f32": 3}
    assert groups["mhc"] == {"f32": 6} and groups["attention"]["fp8-block"] == 25
    text = format_summary(s)
    assert "5 decoder (2 sliding, 2 csa, 1 hca; 3 hash-routed) + 3 DSpark; 5 stored" in text
    assert "expert_dtype fp4" in text


def test_inspect_check_cli_exits_one_on_a_v4_error(tmp_path):
    ck = build_v4("flash-base")
    del ck.config["expert_dtype"]
    result = CliRunner().invoke(app, ["inspect", str(ck.write(tmp_path / "c")), "--check"])
    assert result.exit_code == 1, result.output
    assert "ERROR [v4-expert-dtype]" in result.output and '"expert_dtype": "fp8"' in result.output
