"""Every recipe x convention on synthetic checkpoints: names, dtypes, shapes (formats.md), error bounds,
byte-identical excluded tensors, fused partners, configs, index, and compressed-tensors' own decompression."""

from __future__ import annotations

import json
import re

import pytest
import torch
from dsquant.kernels.testing import calc_diff

from dsquant.checkpoint.reader import Checkpoint
from dsquant.convert import convert
from dsquant.formats.fp8 import dequantize_fp8_block
from dsquant.formats.ondisk import dequantize, read_quantized

F8, U8, I8, F32, BF16 = torch.float8_e4m3fn, torch.uint8, torch.int8, torch.float32, torch.bfloat16

# formats.md sections 2.2, 3.2, 4.2: (suffix, dtype, shape from [N, K]) per convention and format.
EXPECTED = {
    ("deepseek", "fp8-block"): [("weight", F8, lambda n, k: (n, k)),
                                ("weight_scale_inv", F32, lambda n, k: (-(-n // 128), -(-k // 128)))],
    ("compressed-tensors", "fp8-block"): [("weight", F8, lambda n, k: (n, k)),
                                          ("weight_scale", F32, lambda n, k: (-(-n // 128), -(-k // 128)))],
    ("compressed-tensors", "int8"): [("weight", I8, lambda n, k: (n, k)), ("weight_scale", F32, lambda n, k: (n, 1))],
    ("compressed-tensors", "nvfp4"): [("weight_packed", U8, lambda n, k: (n, k // 2)),
                                      ("weight_scale", F8, lambda n, k: (n, k // 16)),
                                      ("weight_global_scale", F32, lambda n, k: (1,)),
                                      ("input_global_scale", F32, lambda n, k: (1,))],
    ("modelopt", "nvfp4"): [("weight", U8, lambda n, k: (n, k // 2)), ("weight_scale", F8, lambda n, k: (n, k // 16)),
                            ("weight_scale_2", F32, lambda n, k: ()), ("input_scale", F32, lambda n, k: ())],
    ("compressed-tensors", "mxfp4"): [("weight_packed", U8, lambda n, k: (n, k // 2)),
                                      ("weight_scale", U8, lambda n, k: (n, k // 32))],
}

# Global error bound per format, calc_diff = 1 - cos-like similarity ~ (relative RMS error)^2 / 2, for the
# Gaussian-like synthetic weights. FP8 E4M3 (3 mantissa bits) and NVFP4 thresholds are DeepGEMM's per-format
# test bounds (1e-3; 1e-2..2e-2). INT8 per-row: step = amax/127 ~ 4 sigma/127, RMS error step/sqrt(12) ~ 1% of
# sigma -> 5e-5, bound 1e-4. MXFP4's power-of-two scales leave on average half a binade unused, doubling
# NVFP4's error variance: 4e-2.
MAX_DIFF = {"fp8-block": 1e-3, "int8": 1e-4, "nvfp4": 2e-2, "mxfp4": 4e-2}

KEEP = re.compile(r".*(embed_tokens|lm_head|shared_head\.head|norm|mlp\.gate|eh_proj|indexer\.weights_proj)$")


def expected_format(recipe: str, module: str, mtp: int) -> str:
    """The format each recipe promises for a module (written out here, independently of the recipe code)."""
    if KEEP.fullmatch(module):
        return "keep"
    in_mtp = module.startswith(f"model.layers.{mtp}.")
    if recipe in ("fp8-block", "fp8-block-ue8m0"):
        return "fp8-block"
    if recipe == "int8":
        return "bf16" if ".indexer." in module else "int8"
    if recipe == "mxfp4":
        return "mxfp4" if ".mlp.experts." in module else "fp8-block"
    if recipe == "nvfp4":
        return "bf16" if in_mtp or ".self_attn." in module else "nvfp4"
    if recipe == "nvfp4-experts-only":
        return "nvfp4" if ".mlp.experts." in module and not in_mtp else "bf16"
    raise AssertionError(recipe)


def source_weight(src: Checkpoint, name: str) -> torch.Tensor:
    """The source weight as float32 (FP8 sources dequantized exactly)."""
    if name + "_scale_inv" in src:
        return dequantize_fp8_block(src.get(name), src.get(name + "_scale_inv"), dtype=F32)
    return src.get(name).float()


MATRIX = [
    ("v3", "bf16", "fp8-block", "deepseek"), ("v3", "fp8", "fp8-block", "compressed-tensors"),
    ("v3", "fp8-ue8m0", "fp8-block-ue8m0", "deepseek"),
    ("v3", "bf16", "int8", "compressed-tensors"), ("v3", "fp8", "nvfp4", "modelopt"),
    ("v3", "bf16", "nvfp4", "compressed-tensors"), ("v3", "fp8", "nvfp4-experts-only", "modelopt"),
    ("v3", "bf16", "nvfp4-experts-only", "compressed-tensors"), ("v3", "fp8", "mxfp4", "compressed-tensors"),
    ("v3.2", "fp8", "fp8-block", "deepseek"), ("v3.2", "bf16", "int8", "compressed-tensors"),
    ("v2-lite", "bf16", "nvfp4", "modelopt"), ("v2-lite", "bf16", "mxfp4", "compressed-tensors"),
    ("kimi-k2", "fp8", "nvfp4", "compressed-tensors"), ("kimi-k2", "fp8", "int8", "compressed-tensors"),
]


@pytest.fixture(scope="module")
def converted(synth, tmp_path_factory):
    cache = {}

    def get(variant, source, recipe, convention):
        key = (variant, source, recipe, convention)
        if key not in cache:
            dst = tmp_path_factory.mktemp("out") / f"{variant}-{recipe}-{convention}"
            convert(synth(variant, source), dst, recipe, convention=convention, max_shard_size="2MB",
                    progress=False)
            cache[key] = dst
        return cache[key]

    return get


@pytest.mark.parametrize("variant,source,recipe,convention", MATRIX, ids=lambda v: str(v))
def test_convert_output_matches_formats_md(synth, converted, variant, source, recipe, convention):
    src = Checkpoint(synth(variant, source))
    dst = converted(variant, source, recipe, convention)
    out = Checkpoint(dst)
    mtp = src.config["num_hidden_layers"]
    qc = out.config["quantization_config"]
    produced = set()
    for name in sorted(n for n in src.infos if not n.endswith("_scale_inv")):
        module = name.rsplit(".", 1)[0]
        fmt = expected_format(recipe, module, mtp)
        info = src.infos[name]
        if fmt in ("keep", "bf16"):
            produced.add(name)
            if info.dtype == F8:  # exact dequantization of the FP8 source, stored BF16
                want = dequantize_fp8_block(src.get(name), src.get(name + "_scale_inv"), dtype=BF16)
                assert torch.equal(out.get(name).view(torch.int16), want.view(torch.int16)), name
            else:
                assert out.raw(name) == src.raw(name), f"{name}: excluded tensor not byte-identical"
            assert not any(n.startswith(module + ".") and n != name and "weight_scale" in n or
                           n.startswith(module + ".input") for n in out.infos), f"{module}: scale on excluded module"
            continue
        n, k = info.shape
        for suffix, dtype, shape in EXPECTED[(convention, fmt)]:
            t = out.infos[f"{module}.{suffix}"]
            assert (t.dtype, t.shape) == (dtype, shape(n, k)), f"{module}.{suffix}: {t.dtype} {t.shape}"
            produced.add(f"{module}.{suffix}")
        qw = read_quantized(module, out, qc)
        assert qw.fmt == fmt, module
        deq, ref = dequantize(qw, F32), source_weight(src, name)
        assert torch.isfinite(deq).all(), f"{module}: NaN/Inf after dequantization"
        diff = calc_diff(deq, ref)
        assert diff <= MAX_DIFF[fmt], f"{module} {fmt}: calc_diff {diff:.2e} > {MAX_DIFF[fmt]}"
        if source != "bf16" and fmt == "fp8-block" and not recipe.endswith("ue8m0"):
            assert torch.equal(deq, ref), f"{module}: FP8 source re-quantized to FP8 blocks must be exact"
    assert produced == set(out.infos), f"unexpected tensors {sorted(set(out.infos) - produced)[:5]}"


@pytest.mark.parametrize("variant,source,recipe,convention", MATRIX[:9], ids=lambda v: str(v))
def test_convert_configs_index_and_files(synth, converted, variant, source, recipe, convention):
    src_path = synth(variant, source)
    dst = converted(variant, source, recipe, convention)
    cfg = json.loads((dst / "config.json").read_text())
    src_cfg = json.loads((src_path / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
        {k: v for k, v in src_cfg.items() if k != "quantization_config"}, "architecture keys must be kept verbatim"
    qc = cfg["quantization_config"]
    if convention == "deepseek":
        assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
        assert qc["activation_scheme"] == "dynamic"
        assert (qc.get("scale_fmt") == "ue8m0") == recipe.endswith("ue8m0")
    elif convention == "modelopt":
        assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"  # no stale FP8 config
        hq = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
        assert hq["quant_algo"] == "NVFP4" and hq["group_size"] == 16 and hq["kv_cache_quant_algo"]
        assert "lm_head" in hq["exclude_modules"] and not any("*" in m for m in hq["exclude_modules"])
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
        assert "lm_head" in qc["ignore"] and "model.layers.1.mlp.gate" in qc["ignore"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    out = Checkpoint(dst)
    assert set(index["weight_map"]) == set(out.infos)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in out.infos.values())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src_path / f).read_bytes(), f
    record = json.loads((dst / "dsquant_recipe.json").read_text())
    assert record["recipe"]["name"] == recipe and record["convention"] == convention
    assert record["source"]["dtype"] == ("bf16" if source == "bf16" else "fp8")
    assert record["activation_scales"] == "default" and record["bytes_out"] > 0
    assert {"pattern": "lm_head", "reason": record["excluded"][1]["reason"]} in record["excluded"]
    assert not list(dst.glob(".dsquant*")) and not list(dst.glob(".*.partial")), "bookkeeping left behind"


def test_shards_bounded_by_max_shard_size(converted):
    dst = converted("v3", "fp8", "nvfp4", "modelopt")
    sizes = [p.stat().st_size for p in dst.glob("model-*.safetensors")]
    # 2MB bound (decimal); a shard may exceed it only by the header, or hold one item larger than the bound.
    assert len(sizes) > 2 and all(s <= 2_000_000 + 64_000 for s in sizes), sizes


@pytest.mark.parametrize("recipe,convention", [("nvfp4", "modelopt"), ("nvfp4", "compressed-tensors")])
def test_fused_partners_share_global_and_input_scales(converted, recipe, convention):
    dst = converted("v3", "fp8" if convention == "modelopt" else "bf16", recipe, convention)
    out = Checkpoint(dst)
    g, a = ("weight_scale_2", "input_scale") if convention == "modelopt" else ("weight_global_scale",
                                                                               "input_global_scale")
    pairs = [n[: -len(".gate_proj." + g)] for n in out.infos if n.endswith(".gate_proj." + g)]
    assert len(pairs) > 8
    distinct = set()
    for p in pairs:
        for suffix in (g, a):
            assert torch.equal(out.get(f"{p}.gate_proj.{suffix}"), out.get(f"{p}.up_proj.{suffix}")), (p, suffix)
        distinct.add(float(out.get(f"{p}.gate_proj.{g}").reshape(())))
    assert len(distinct) > 1, "global scales should differ between experts (each from its own amax)"


def _ct_scheme(qc, module):
    from compressed_tensors.quantization import QuantizationScheme

    for group in qc["config_groups"].values():
        for t in group["targets"]:
            if t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)):
                return QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                          input_activations=group["input_activations"]), group["format"]
    raise AssertionError(f"{module}: no config group targets it")


# The compressed-tensors preset whose QuantizationArgs each format's config group must carry (what
# llm-compressor writes for that scheme: ModelCompressor.update_config dumps the preset's QuantizationConfig).
CT_PRESET = {"float-quantized": "FP8_BLOCK", "int-quantized": "W8A8", "nvfp4-pack-quantized": "NVFP4",
             "mxfp4-pack-quantized": "MXFP4A16"}
CT_OUTPUTS = [(variant, source, recipe) for variant, source, recipe, convention in MATRIX
              if convention == "compressed-tensors"]


def _linear_tree(ckpt: Checkpoint) -> torch.nn.Module:
    """Float32 nn.Linear modules under the checkpoint's module names, for every stored 2-D projection (a model
    that compressed-tensors can quantize and decompress without transformers' fused experts)."""
    root = torch.nn.Module()
    for name, info in ckpt.infos.items():
        module, _, attr = name.rpartition(".")
        if attr not in ("weight", "weight_packed") or len(info.shape) != 2 or module.endswith(("embed_tokens",
                                                                                            "mlp.gate")):
            continue
        n, k = info.shape
        parent, *path = root, *module.split(".")
        for part in path[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path[-1], torch.nn.Linear(k * (2 if attr == "weight_packed" else 1), n, bias=False))
    return root


def _assert_linears_match(model: torch.nn.Module, out: Checkpoint, qc: dict, what: str) -> int:
    """Every quantized linear the library decompressed equals dsquant's dequantization, bit for bit, in the dtype
    the library gives it (the float32 model's for INT8/FP8, BF16 for FP4)."""
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight_scale" in out.infos:
            ours = dequantize(read_quantized(name, out, qc), mod.weight.dtype)
            assert torch.equal(mod.weight.data, ours), f"{what}: {name} differs from dsquant's dequantization"
            checked += 1
    return checked


@pytest.mark.parametrize("variant,source,recipe", CT_OUTPUTS, ids=lambda v: str(v))
def test_compressed_tensors_config_groups_are_the_library_presets(converted, variant, source, recipe):
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed in this env")
    from compressed_tensors.quantization import preset_name_to_scheme

    qc = Checkpoint(converted(variant, source, recipe, "compressed-tensors")).config["quantization_config"]
    for name, group in qc["config_groups"].items():
        scheme = preset_name_to_scheme(CT_PRESET[group["format"]], ["Linear"])
        preset = ct.QuantizationConfig(config_groups={"g": scheme})
        theirs = preset.model_dump(mode="json")["config_groups"]["g"]
        for key in ("weights", "input_activations", "output_activations"):
            assert group[key] == theirs[key], f"{name} {key}: {group[key]} != the preset's {theirs[key]}"


@pytest.mark.parametrize("variant,source,recipe", CT_OUTPUTS, ids=lambda v: str(v))
def test_compressed_tensors_library_decompresses_like_dsquant(converted, variant, source, recipe):
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed in this env")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import apply_quantization_config

    dst = converted(variant, source, recipe, "compressed-tensors")
    out = Checkpoint(dst)
    qc = out.config["quantization_config"]
    config = ct.QuantizationConfig.model_validate(qc)  # the library parses our config
    checked = 0
    for name in out.infos:
        if not name.endswith("weight_scale") or name.rsplit(".", 1)[0] in qc["ignore"]:
            continue
        module = name.rsplit(".", 1)[0]
        scheme, fmt = _ct_scheme(qc, module)
        local = {n[len(module) + 1:]: out.get(n) for n in out.infos if n.startswith(module + ".")}
        theirs = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]
        # The library returns its own dtype (BF16 for FP4); ours, rounded once to that dtype, must match bit for bit.
        ours = dequantize(read_quantized(module, out, qc), theirs.dtype)
        assert theirs.shape == ours.shape and torch.equal(theirs, ours), f"{module}: {fmt} decompression differs"
        checked += 1
    assert checked > 10

    # Model level, as transformers and llm-compressor load a checkpoint: the library assigns each module its
    # scheme from our config (targets, ignore), lays out the parameters it expects, takes exactly our tensors
    # (strict: a tensor it expects and we did not write, e.g. a static input_scale, fails here) and decompresses.
    model = _linear_tree(out)
    apply_quantization_config(model, config, show_progress=False)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    modules = dict(model.named_modules())
    model.load_state_dict({n: out.get(n) for n in out.infos if n.rpartition(".")[0] in modules}, strict=True)
    compressor.decompress_model(model)
    assert _assert_linears_match(model, out, qc, "compressed-tensors decompress_model") == checked


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    """DeepSeek-V3 layout without routed experts (every layer, MTP included, dense)."""
    from dsquant.checkpoint.synth import make_synthetic_checkpoint

    def get(source):
        return make_synthetic_checkpoint(tmp_path_factory.mktemp(f"dense-{source}"), variant="v3", source=source,
                                         num_shards=1, first_k_dense_replace=4)

    return get


@pytest.mark.parametrize("source,recipe", [("bf16", "int8"), ("bf16", "nvfp4"), ("fp8", "fp8-block"),
                                           ("fp8", "mxfp4")])
def test_transformers_loads_compressed_tensors_outputs(tmp_path, dense_source, source, recipe):
    """transformers' from_pretrained (its compressed-tensors quantizer) loads the output and the library's
    decompression gives dsquant's weights. Routed experts are left out: transformers fuses DeepSeek's experts
    into 3-D parameters that compressed-tensors does not quantize, so it cannot load quantized per-expert tensors
    from any producer (INT8/FP8 stop in CompressedTensorsDequantize, NVFP4 codes are read as values). The
    mxfp4 recipe therefore shows here only its FP8-block part; its MXFP4 experts are checked at model level by
    test_compressed_tensors_library_decompresses_like_dsquant."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed in this env")

    dst = tmp_path / recipe
    convert(dense_source(source), dst, recipe, convention="compressed-tensors", progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    mtp = f"model.layers.{model.config.num_hidden_layers}."  # transformers builds no MTP layer
    assert all(k.startswith(mtp) for k in info["unexpected_keys"]), sorted(info["unexpected_keys"])[:5]
    model.hf_quantizer.compressor.decompress_model(model)
    out = Checkpoint(dst)
    assert _assert_linears_match(model, out, out.config["quantization_config"], "transformers") > 8
