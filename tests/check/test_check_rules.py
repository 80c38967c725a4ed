"""--check rules on what the tensors say (exclude lists, fused partners, scales and packing, router, MTP layer):
a hand-made checkpoint that breaks each rule. Fixtures: tests/check/ckpt_factory.py, written from formats.md, not
by dsquant's converter, so the rules are tested on checkpoints "made by any tool"."""

from __future__ import annotations

import json

import pytest
import torch

from dsquant.check import check_checkpoint
from dsquant.checkpoint.index import CheckpointError
from dsquant.formats import quantize_fp8_block, quantize_mxfp4
from tests.check.check_helpers import EXP0, L0, L1, hits, only, run
from tests.check.ckpt_factory import MTP, build

# --- exclude/ignore lists ---------------------------------------------------------------------------


def test_modelopt_substring_exclude_hits_gate_proj(tmp_path):
    ck = build("modelopt")
    ck.hf_quant_config["quantization"]["exclude_modules"] = ck.hf_quant_config["quantization"]["exclude_modules"] + [
        "mlp.gate"]
    f = only(run(tmp_path, ck), "exclude-overmatch")
    assert f.tensor == L0 + "mlp.gate_proj" and "'mlp.gate'" in f.message and f.file == "hf_quant_config.json"


def test_compressed_tensors_unanchored_regex_hits_gate_proj(tmp_path):
    ck = build("ct-nvfp4")
    ck.config["quantization_config"]["ignore"] = ["lm_head", r"re:.*self_attn\..*", r"re:.*mlp\.gate",
                                                  rf"re:^model\.layers\.{MTP}\..*"]
    f = only(run(tmp_path, ck), "exclude-overmatch")
    assert f.tensor == L0 + "mlp.gate_proj" and "compressed-tensors matching" in f.message


def test_overmatch_on_unquantized_modules_is_a_warning(tmp_path):
    ck = build("ct-nvfp4")
    ck.config["quantization_config"]["ignore"] += [r"re:.*self_attn\.kv_b"]  # hits kv_b_proj, which is BF16
    f = only(run(tmp_path, ck), "exclude-overmatch", "warning")
    assert f.tensor == L0 + "self_attn.kv_b_proj"


def test_exclude_entry_matching_nothing_is_a_warning(tmp_path):
    ck = build("modelopt")
    ck.hf_quant_config["quantization"]["exclude_modules"] = ck.hf_quant_config["quantization"]["exclude_modules"] + [
        "model.layers.0.mlp.gate_up_proj"]
    assert "gate_up_proj" in only(run(tmp_path, ck), "exclude-unmatched", "warning").message


def test_scale_tensors_on_an_excluded_module(tmp_path):
    ck = build("modelopt")
    ck.tensors["lm_head.input_scale"] = torch.tensor(0.01)
    assert only(run(tmp_path, ck), "excluded-but-quantized").tensor == "lm_head"


def test_quantized_module_not_targeted_by_compressed_tensors(tmp_path):
    ck = build("ct-int8")
    ck.config["quantization_config"]["config_groups"]["group_0"]["targets"] = [r"re:.*mlp\.experts\..*"]
    f = only(run(tmp_path, ck), "quantized-not-declared")
    assert f.tensor in (L0 + "mlp.down_proj", L0 + "mlp.gate_proj", L0 + "mlp.up_proj")


def test_unquantized_linear_not_excluded(tmp_path):
    ck = build("modelopt")
    exclude = [e for e in ck.hf_quant_config["quantization"]["exclude_modules"] if "layers.1.self_attn" not in e]
    ck.hf_quant_config["quantization"]["exclude_modules"] = exclude
    ck.config["quantization_config"]["ignore"] = exclude
    f = only(run(tmp_path, ck), "unquantized-not-excluded")
    assert f.tensor.startswith(L1 + "self_attn.") and "5 module(s)" in f.message


# --- fused partners ---------------------------------------------------------------------------------


def test_fused_partners_with_different_schemes(tmp_path):
    ck, ref = build("modelopt"), build("bf16")
    for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
        del ck.tensors[EXP0 + "up_proj." + suffix]
    ck.tensors[EXP0 + "up_proj.weight"] = ref.tensors[EXP0 + "up_proj.weight"]
    ck.hf_quant_config["quantization"]["exclude_modules"].append(EXP0 + "up_proj")
    f = only(run(tmp_path, ck), "fused-scheme")
    assert f.tensor == EXP0 + "gate_proj" and "nvfp4" in f.message and "bf16" in f.message


@pytest.mark.parametrize("kind,param", [("modelopt", "weight_scale_2"), ("modelopt", "input_scale"),
                                        ("ct-nvfp4", "weight_global_scale"), ("ct-nvfp4", "input_global_scale")])
def test_fused_nvfp4_partners_with_different_global_scales(tmp_path, kind, param):
    ck = build(kind)
    name = EXP0 + "up_proj." + param
    ck.tensors[name] = ck.tensors[name] * 1.5
    f = only(run(tmp_path, ck), "fused-global-scale")
    assert f.tensor == EXP0 + "gate_proj." + param


def test_q_a_and_kv_a_partners_checked_too(tmp_path):
    ck = build("deepseek-fp8")
    m = L0 + "self_attn.kv_a_proj_with_mqa"
    del ck.tensors[m + ".weight_scale_inv"]
    ck.tensors[m + ".weight"] = build("bf16").tensors[m + ".weight"]
    ck.config["quantization_config"]["ignored_layers"] = [m]
    f = only(run(tmp_path, ck), "fused-scheme")
    assert f.tensor == L0 + "self_attn.q_a_proj"


# --- scales and packed shapes -----------------------------------------------------------------------


def test_fp8_weight_without_scale(tmp_path):
    ck = build("deepseek-fp8")
    del ck.tensors[L0 + "self_attn.o_proj.weight_scale_inv"]
    assert only(run(tmp_path, ck), "missing-scale").tensor == L0 + "self_attn.o_proj.weight"


def test_fp8_scale_under_the_other_conventions_name(tmp_path):
    ck = build("deepseek-fp8")
    m = L0 + "self_attn.o_proj."
    ck.tensors[m + "weight_scale"] = ck.tensors.pop(m + "weight_scale_inv")
    assert only(run(tmp_path, ck), "scale-name").tensor == m + "weight"


def test_fp8_block_scale_with_wrong_shape(tmp_path):
    ck = build("deepseek-fp8")
    name = L0 + "mlp.down_proj.weight_scale_inv"
    ck.tensors[name] = torch.ones(2, 1)
    assert only(run(tmp_path, ck), "scale-shape").tensor == name


def test_global_scale_not_one_value(tmp_path):
    ck = build("modelopt")
    for p in ("gate_proj", "up_proj"):  # both partners, so only the shape rule fires
        ck.tensors[EXP0 + p + ".weight_scale_2"] = ck.tensors[EXP0 + p + ".weight_scale_2"].reshape(1).repeat(2)
    f = only(run(tmp_path, ck), "scale-shape")
    assert "expected one float32 value" in f.message


def test_deepseek_fp8_block_scale_in_bf16_is_a_warning(tmp_path):
    """vLLM and SGLang create weight_scale_inv as a float32 parameter and cast the stored tensor on load."""
    ck = build("deepseek-fp8")
    name = L0 + "mlp.down_proj.weight_scale_inv"
    ck.tensors[name] = ck.tensors[name].to(torch.bfloat16)
    fs = run(tmp_path, ck)
    assert not [f for f in fs if f.severity == "error"], [str(f) for f in fs]
    assert only(fs, "scale-dtype", "warning").tensor == name


def test_global_scale_in_bf16_is_a_warning(tmp_path):
    """Engines create global scales as float32 parameters and cast the stored value on load."""
    ck = build("modelopt")
    for p in ("gate_proj", "up_proj"):
        ck.tensors[EXP0 + p + ".weight_scale_2"] = ck.tensors[EXP0 + p + ".weight_scale_2"].to(torch.bfloat16)
    fs = run(tmp_path, ck)
    assert not [f for f in fs if f.severity == "error"], [str(f) for f in fs]
    assert "is BF16" in only(fs, "scale-dtype", "warning").message


@pytest.mark.parametrize("kind", ["modelopt", "ct-mxfp4"])
def test_swizzled_block_scale(tmp_path, kind):
    ck = build(kind)
    name = L0 + "mlp.down_proj.weight_scale"  # [64, 128/16=8] or [64, 4]: the 128x4 layout pads to [128, 8]/[128, 4]
    s = ck.tensors[name]
    padded = torch.zeros(128, -(-s.shape[1] // 4) * 4, dtype=s.dtype)
    padded[: s.shape[0], : s.shape[1]] = s
    ck.tensors[name] = padded
    assert only(run(tmp_path, ck), "swizzled-block-scale").tensor == name


def test_fp4_packed_along_n(tmp_path):
    ck = build("ct-mxfp4")
    m = L0 + "mlp.up_proj."
    w = ck.tensors[m + "weight_packed"]  # [128, 32] = [N, K/2]
    ck.tensors[m + "weight_packed"] = torch.zeros(w.shape[0] // 2, w.shape[1] * 2, dtype=torch.uint8)
    f = only(run(tmp_path, ck), "packed-shape")
    assert f.tensor == m + "weight_packed" and "packed along N" in f.message


def test_global_scale_stored_in_the_other_direction(tmp_path):
    ck = build("ct-nvfp4")
    for p in ("gate_proj", "up_proj"):
        name = EXP0 + p + ".weight_global_scale"
        ck.tensors[name] = 1 / ck.tensors[name]  # ModelOpt multiplier written under the CT (divisor) name
    f = only(run(tmp_path, ck), "global-scale-value", "warning")
    assert "multiplier" in f.message


def test_non_finite_global_scale(tmp_path):
    ck = build("modelopt")
    for p in ("gate_proj", "up_proj"):
        ck.tensors[EXP0 + p + ".input_scale"] = torch.tensor(float("nan"))
    assert only(run(tmp_path, ck), "global-scale-value").tensor.startswith(EXP0)


def test_ue8m0_declared_but_scales_not_powers_of_two(tmp_path):
    ck = build("deepseek-fp8")
    ck.config["quantization_config"]["scale_fmt"] = "ue8m0"
    assert only(run(tmp_path, ck), "ue8m0-scale")
    ck = build("deepseek-fp8")
    ck.config["quantization_config"]["scale_fmt"] = "ue8m0"
    for name in [n for n in ck.tensors if n.endswith(".weight_scale_inv")]:
        w = build("bf16").tensors[name[: -len("_scale_inv")]]
        ck.tensors[name[: -len("_scale_inv")]], ck.tensors[name] = quantize_fp8_block(w, ue8m0=True)
    assert run(tmp_path / "pow2", ck) == []


# --- router ----------------------------------------------------------------------------------------


def test_quantized_router(tmp_path):
    ck = build("deepseek-fp8")
    q, s = quantize_fp8_block(ck.tensors[L1 + "mlp.gate.weight"])
    ck.tensors[L1 + "mlp.gate.weight"], ck.tensors[L1 + "mlp.gate.weight_scale_inv"] = q, s
    assert only(run(tmp_path, ck), "router-dtype").tensor == L1 + "mlp.gate.weight (fp8-block)"


def test_router_bias_not_float32_or_missing(tmp_path):
    ck = build("bf16")
    name = L1 + "mlp.gate.e_score_correction_bias"
    ck.tensors[name] = ck.tensors[name].to(torch.bfloat16)
    fs = run(tmp_path, ck)  # engines cast it into a float32 parameter: a loss of precision, not a failure
    assert "BF16" in only(fs, "router-bias", "warning").message and not hits(fs, "router-bias")
    ck = build("bf16")
    del ck.tensors[name]
    assert "noaux_tc" in only(run(tmp_path / "b", ck), "router-bias").message


def test_router_weight_in_float32_is_a_warning(tmp_path):
    ck = build("bf16")
    ck.tensors[L1 + "mlp.gate.weight"] = ck.tensors[L1 + "mlp.gate.weight"].float()
    assert only(run(tmp_path, ck), "router-dtype", "warning")


# --- MTP layer -------------------------------------------------------------------------------------


def test_mtp_layer_dropped(tmp_path):
    ck = build("ct-nvfp4")
    ck.tensors = {n: t for n, t in ck.tensors.items() if not n.startswith(f"model.layers.{MTP}.")}
    fs = run(tmp_path, ck)
    f = only(fs, "mtp-missing", "warning")
    assert f.tensor == f"model.layers.{MTP}" and "speculative decoding" in f.message
    assert not [f for f in fs if f.severity == "error"]  # the main model still loads


def test_mtp_helper_tensors_missing(tmp_path):
    ck = build("modelopt")
    del ck.tensors[f"model.layers.{MTP}.enorm.weight"]
    del ck.tensors[f"model.layers.{MTP}.embed_tokens.weight"]
    fs = run(tmp_path, ck)
    assert only(fs, "mtp-missing").tensor == f"model.layers.{MTP}.enorm.weight"
    assert only(fs, "mtp-missing", "warning").tensor == f"model.layers.{MTP}.embed_tokens.weight"


def test_mtp_eh_proj_quantized(tmp_path):
    ck = build("deepseek-fp8")
    name = f"model.layers.{MTP}.eh_proj.weight"
    ck.tensors[name], ck.tensors[name + "_scale_inv"] = quantize_fp8_block(ck.tensors[name])
    assert only(run(tmp_path, ck), "mtp-eh-proj").tensor == name


def test_mtp_quantized_while_excluded(tmp_path):
    ck, fp8 = build("modelopt"), build("deepseek-fp8")
    m = f"model.layers.{MTP}.self_attn.o_proj"
    ck.tensors[m + ".weight"], ck.tensors[m + ".weight_scale_inv"] = fp8.tensors[m + ".weight"], fp8.tensors[
        m + ".weight_scale_inv"]
    f = only(run(tmp_path, ck), "mtp-declared")
    assert f.tensor == m and "declares it excluded" in f.message


def test_mtp_bf16_while_declared_quantized(tmp_path):
    ck, ref = build("deepseek-fp8"), build("bf16")
    prefix = f"model.layers.{MTP}."
    for name in [n for n in ck.tensors if n.startswith(prefix) and n.endswith("_scale_inv")]:
        del ck.tensors[name]
        ck.tensors[name[: -len("_scale_inv")]] = ref.tensors[name[: -len("_scale_inv")]]
    f = only(run(tmp_path, ck), "mtp-declared")
    assert "declares it quantized" in f.message and "re:^model\\.layers\\.2\\..*" in f.message


def test_int8_channel_scale_must_be_two_dimensional(tmp_path):
    ck = build("ct-int8")
    name = L0 + "mlp.up_proj.weight_scale"
    ck.tensors[name] = ck.tensors[name].reshape(-1)
    f = only(run(tmp_path, ck), "scale-shape")
    assert f.tensor == name and "[128, 1]" in f.message


def test_index_value_that_is_not_a_file_name(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = 3
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'lm_head.weight' does not name a file"):
        check_checkpoint(path)


def test_experts_of_one_layer_in_mixed_formats(tmp_path):
    ck, fp8 = build("modelopt"), build("deepseek-fp8")
    e = L1 + "mlp.experts.3."
    for p in ("gate_proj", "up_proj", "down_proj"):
        for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            del ck.tensors[e + p + "." + suffix]
        ck.tensors[e + p + ".weight"] = fp8.tensors[e + p + ".weight"]
        ck.tensors[e + p + ".weight_scale"] = fp8.tensors[e + p + ".weight_scale_inv"]
    fs = run(tmp_path, ck)
    f = only(fs, "moe-uniform")
    assert f.tensor.startswith(e) and "9 nvfp4" in f.message and "3 fp8" in f.message


def test_nvfp4_activation_scale_missing_or_unexpected(tmp_path):
    ck = build("modelopt")
    for p in ("gate_proj", "up_proj"):
        del ck.tensors[EXP0 + p + ".input_scale"]
    assert only(run(tmp_path, ck), "activation-scale").tensor == EXP0 + "gate_proj.weight"
    ck = build("ct-nvfp4")
    ck.config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None  # W4A16
    f = only(run(tmp_path / "b", ck), "activation-scale")
    assert f.tensor.endswith(".input_global_scale") and "W4A16" in f.message


def test_exclude_lists_of_config_json_and_hf_quant_config_differ(tmp_path):
    ck = build("modelopt")
    qc = ck.config["quantization_config"]
    qc["ignore"] = qc["ignore"] + ["model.layers.1.mlp.gate"]
    f = only(run(tmp_path, ck), "stale-quant-config", "warning")
    assert "model.layers.1.mlp.gate" in f.message


def test_invalid_regex_in_a_compressed_tensors_ignore_entry(tmp_path):
    ck = build("ct-mxfp4")
    ck.config["quantization_config"]["ignore"] += ["re:model.layers.[0"]
    f = only(run(tmp_path, ck), "exclude-invalid")
    assert "re:model.layers.[0" in f.message and f.file == "config.json"


def test_module_stored_in_another_format_than_its_config_group(tmp_path):
    ck, mx = build("ct-nvfp4"), build("ct-mxfp4")
    qc = ck.config["quantization_config"]
    mx_weights = mx.config["quantization_config"]["config_groups"]["group_0"]["weights"]
    qc["config_groups"]["group_1"] = {"weights": mx_weights, "input_activations": None,
                                      "targets": [r"re:.*mlp\.experts\..*"]}
    f = only(run(tmp_path, ck), "declared-format")
    assert f.tensor.startswith(L1 + "mlp.experts.") and "is nvfp4 but declared mxfp4" in f.message
    ck.tensors.update({n: t for n, t in mx.tensors.items() if ".mlp.experts." in n})
    for n in [n for n in ck.tensors if ".mlp.experts." in n and n.rsplit(".", 1)[1] in ("weight_global_scale",
                                                                                          "input_global_scale")]:
        del ck.tensors[n]
    assert run(tmp_path / "fixed", ck) == []  # experts MXFP4 by the regex group, the rest NVFP4 by `Linear`


def test_tensor_stored_in_two_shards(tmp_path):
    from safetensors.torch import save_file

    path = build("bf16").write(tmp_path / "c", index=False, num_shards=1)
    save_file({"lm_head.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path / "extra.safetensors"))
    f = only(check_checkpoint(path), "index")
    assert f.tensor == "lm_head.weight" and "both" in f.message


def test_mla_projection_stored_as_fp4(tmp_path):
    ck = build("ct-mxfp4")
    m = L0 + "self_attn.kv_b_proj"
    ck.tensors[m + ".weight_packed"], ck.tensors[m + ".weight_scale"] = quantize_mxfp4(ck.tensors.pop(m + ".weight"))
    ck.config["quantization_config"]["ignore"] = ["lm_head", r"re:.*self_attn\.(q_a|q_b|kv_a|o)_.*",
                                                  L1 + "self_attn.kv_b_proj", r"re:.*mlp\.gate$",
                                                  rf"re:^model\.layers\.{MTP}\..*"]
    fs = run(tmp_path, ck)
    assert only(fs, "mla-format").tensor == m
    assert [f.rule for f in fs if f.severity == "error"] == ["mla-format"]  # otherwise consistent


def test_nvfp4_activations_not_dynamic_local_is_a_warning(tmp_path):
    """compressed-tensors and transformers need dynamic "local" for NVFP4 activations; vLLM loads either."""
    ck = build("ct-nvfp4")
    assert not [f for f in run(tmp_path, ck) if f.rule == "quant-config-keys"]
    ck.config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    fs = run(tmp_path / "b", ck)
    assert "dynamic is False" in only(fs, "quant-config-keys", "warning").message
    assert not [f for f in fs if f.severity == "error"], [str(f) for f in fs]


def test_config_stating_rope_in_two_disagreeing_layouts_is_a_warning(tmp_path):
    ck = build("bf16")
    assert not [f for f in run(tmp_path, ck) if f.rule == "config-layout"]
    ck.config["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}
    ck.config["rope_theta"] = 10000.0
    f = only(run(tmp_path / "b", ck), "config-layout", "warning")
    assert "rope_theta 10000.0 disagrees with rope_parameters.rope_theta 50000.0" in f.message
