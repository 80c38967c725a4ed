"""compressed-tensors' own reading of a converted checkpoint: its presets, its per-module decompression and its
model-level load (apply_quantization_config, compress_model, strict load_state_dict, decompress_model), compared
with dsquant's dequantization."""

from __future__ import annotations

import re

import torch

from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.ondisk import read_quantized

# The compressed-tensors preset whose QuantizationArgs each format's config group must carry (what
# llm-compressor writes for that scheme: ModelCompressor.update_config dumps the preset's QuantizationConfig).
CT_PRESET = {"float-quantized": "FP8_BLOCK", "int-quantized": "W8A8", "nvfp4-pack-quantized": "NVFP4",
             "mxfp4-pack-quantized": "MXFP4A16"}


def assert_groups_are_presets(qc: dict) -> None:
    """Every config group's arguments are those compressed-tensors dumps for its format's preset."""
    import compressed_tensors as ct
    from compressed_tensors.quantization import preset_name_to_scheme

    for name, group in qc["config_groups"].items():
        scheme = preset_name_to_scheme(CT_PRESET[group["format"]], ["Linear"])
        theirs = ct.QuantizationConfig(config_groups={"g": scheme}).model_dump(mode="json")["config_groups"]["g"]
        for key in ("weights", "input_activations", "output_activations"):
            assert group[key] == theirs[key], f"{name} {key}: {group[key]} != the preset's {theirs[key]}"


def ct_scheme(qc: dict, module: str):
    """(QuantizationScheme, format) of the config group whose target matches `module`."""
    from compressed_tensors.quantization import QuantizationScheme

    for group in qc["config_groups"].values():
        for t in group["targets"]:
            if t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)):
                return QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                          input_activations=group["input_activations"]), group["format"]
    raise AssertionError(f"{module}: no config group targets it")


def decompress_each(out: Checkpoint, ignored=lambda module: False) -> int:
    """Each module with a `weight_scale`, decompressed by the library's compressor for its group's format, equals
    dsquant's dequantization rounded once to the library's dtype; returns how many were checked."""
    from compressed_tensors.compressors.base import BaseCompressor

    qc = out.config["quantization_config"]
    checked = 0
    for name in out.infos:
        module = name.rsplit(".", 1)[0]
        if not name.endswith("weight_scale") or ignored(module):
            continue
        scheme, fmt = ct_scheme(qc, module)
        local = {n[len(module) + 1:]: out.get(n) for n in out.infos if n.startswith(module + ".")}
        theirs = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]
        ours = read_quantized(module, out, qc).dequantize(theirs.dtype)
        assert theirs.shape == ours.shape and torch.equal(theirs, ours), f"{module}: {fmt} decompression differs"
        checked += 1
    return checked


def linear_tree(ckpt: Checkpoint, skip: tuple[str, ...] = ("embed_tokens", "mlp.gate")) -> torch.nn.Module:
    """Float32 nn.Linear modules under the checkpoint's module names, for every stored 2-D projection (a model
    that compressed-tensors can quantize and decompress without transformers' fused experts)."""
    root = torch.nn.Module()
    for name, info in ckpt.infos.items():
        module, _, attr = name.rpartition(".")
        if attr not in ("weight", "weight_packed") or len(info.shape) != 2 or module.endswith(skip):
            continue
        n, k = info.shape
        parent, *path = root, *module.split(".")
        for part in path[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path[-1], torch.nn.Linear(k * (2 if attr == "weight_packed" else 1), n, bias=False))
    return root


def assert_linears_match(model: torch.nn.Module, out: Checkpoint, qc: dict, what: str) -> int:
    """Every quantized linear the library decompressed equals dsquant's dequantization, bit for bit, in the dtype
    the library gives it (the float32 model's for INT8/FP8, BF16 for FP4)."""
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight_scale" in out.infos:
            ours = read_quantized(name, out, qc).dequantize(mod.weight.dtype)
            assert torch.equal(mod.weight.data, ours), f"{what}: {name} differs from dsquant's dequantization"
            checked += 1
    return checked


def load_like_the_library(out: Checkpoint, skip: tuple[str, ...] = ("embed_tokens", "mlp.gate")) -> int:
    """As transformers and llm-compressor load a checkpoint: the library parses our config, assigns each module its
    scheme (targets, ignore), lays out the parameters it expects, takes exactly our tensors of those linears (strict:
    a tensor it expects and we did not write fails here) and decompresses; returns how many linears matched ours."""
    import compressed_tensors as ct
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    qc = out.config["quantization_config"]
    config = ct.QuantizationConfig.model_validate(qc)
    model = linear_tree(out, skip)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_quantization_config(model, config, show_progress=False)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    model.load_state_dict({n: out.get(n) for n in out.infos if n.rpartition(".")[0] in linears}, strict=True)
    compressor.decompress_model(model)
    return assert_linears_match(model, out, qc, "compressed-tensors decompress_model")
