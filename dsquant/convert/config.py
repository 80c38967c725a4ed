"""The configuration files of a converted checkpoint: quantization_config per convention, hf_quant_config.json,
dsquant_recipe.json, and the non-weight files copied from the source.

Config contents follow formats.md: DeepSeek native `quant_method: fp8` (section 2.1), ModelOpt's flat form
in config.json plus the nested form in hf_quant_config.json with a non-empty exclude_modules, explicit
group_size and kv_cache_quant_algo (section 3.1, pitfall 7), compressed-tensors config_groups (section 4).
Excluded modules are listed by their full HF names, never as unanchored wildcards (pitfall 8).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import dsquant
from dsquant.checkpoint.index import HF_QUANT_CONFIG, INDEX_NAME, write_json_atomic
from dsquant.checkpoint.names import generalize
from dsquant.convert.plan import Plan
from dsquant.formats.registry import get

# job actions that write a module in its recipe format (counted per format in dsquant_recipe.json): V3 quantizing,
# V4 expert transcoding and V4 dense FP8 kept in blocks with the scale dtype the experts need
CONVERTING = ("quant", "transcode", "rescale")
# Never copied: weights (rewritten), the files rewritten here, pickles (never read), and the model card.
_SKIP = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|pkl)$|" + re.escape(INDEX_NAME) +
                   r"|config\.json|hf_quant_config\.json|dsquant_recipe\.json|README\.md|\..*")

# (weights, input_activations) per format: the QuantizationArgs that compressed-tensors itself writes for
# the matching preset (`QuantizationConfig.model_dump(mode="json")` of FP8_BLOCK, W8A8, NVFP4 and MXFP4A16 in
# compressed_tensors/quantization/quant_scheme.py; llm-compressor's save_pretrained wrapper in
# src/llmcompressor/transformers/compression/compressed_tensors_utils.py writes that dump through
# ModelCompressor.update_config), field for field, so the library and transformers load what they would
# load from llm-compressor. NVFP4 activations are dynamic "local": per-16 scales computed at run time under
# the static global `input_global_scale` (dynamic False would promise a static per-group input_scale).
_CT_ARGS = {
    "fp8-block": ({"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "block",
                   "block_structure": [128, 128], "dynamic": False},
                  {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 128, "strategy": "group",
                   "dynamic": True}),
    "int8": ({"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
              "dynamic": False},
             {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
              "dynamic": True}),
    "nvfp4": ({"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
               "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"},
              {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
               "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax"}),
    # weight-only (W4A16): Hopper has no FP4 tensor cores; vLLM and SGLang run MXFP4 experts this way.
    "mxfp4": ({"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
               "dynamic": False, "scale_dtype": "torch.uint8"}, None),
}


def _quantized_modules(plan: Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for job in plan.jobs():
        if job.action == "quant":
            out.setdefault(job.fmt, []).append(job.module)
    return out


def _ct_targets(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Targets per format: "Linear" when one format; else anchored regexes over layer/expert indices, falling
    back to exact names where a regex would also catch another format's modules."""
    if len(groups) == 1:
        return {fmt: ["Linear"] for fmt in groups}
    owner = {m: fmt for fmt, mods in groups.items() for m in mods}
    targets = {}
    for fmt, mods in groups.items():
        pats = {}
        for m in mods:
            pats.setdefault(generalize(m), []).append(m)
        out = []
        for pat, members in sorted(pats.items()):
            rx = "^" + re.escape(pat).replace(r"\*", r"\d+") + "$"
            hits = [m for m in owner if re.match(rx, m)]
            if all(owner[h] == fmt for h in hits):
                out.append("re:" + rx)
            else:
                out.extend(sorted(members))
        targets[fmt] = out
    return targets


def quantization_config(plan: Plan) -> dict:
    """config.json's quantization_config for the plan's convention."""
    groups = _quantized_modules(plan)
    ignore = sorted(plan.excluded_modules)
    if plan.convention == "deepseek":
        rule = next(j.rule for j in plan.jobs() if j.action == "quant")
        qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
              "ignored_layers": ignore}
        if rule.ue8m0:
            qc["scale_fmt"] = "ue8m0"
        return qc
    if plan.convention == "modelopt":
        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        return {"config_groups": {"group_0": {"input_activations": dict(args), "weights": dict(args),
                                              "targets": ["Linear"]}},
                "ignore": ignore, "quant_algo": "NVFP4", "kv_cache_scheme": {"dynamic": False, "num_bits": 8,
                                                                              "type": "float"},
                "producer": {"name": "dsquant", "version": dsquant.__version__}, "quant_method": "modelopt"}
    return compressed_tensors_config(_ct_targets(groups), ignore)


def compressed_tensors_config(targets: dict[str, list[str]], ignore: list[str]) -> dict:
    """A compressed-tensors quantization_config: one config group per format (its library preset's arguments,
    _CT_ARGS, and the registry's ct_format) with the given targets, and the ignore list."""
    config_groups = {}
    for i, fmt in enumerate(sorted(targets)):
        weights, inputs = _CT_ARGS[fmt]
        config_groups[f"group_{i}"] = {"targets": targets[fmt], "weights": weights, "input_activations": inputs,
                                       "output_activations": None, "format": get(fmt).ct_format}
    formats = {get(f).ct_format for f in targets}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None, "sparsity_config": {}}


def hf_quant_config(plan: Plan) -> dict:
    """hf_quant_config.json (ModelOpt nested form), read by TRT-LLM and by SGLang."""
    return {"producer": {"name": "dsquant", "version": dsquant.__version__},
            "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                             # As nvidia/DeepSeek-R1-FP4 and ModelOpt's DeepSeek export: engines then run the MLA
                             # cache in FP8 with scale 1.0; old SGLang rejects a null value here.
                             "kv_cache_quant_algo": "FP8",
                             "exclude_modules": sorted(plan.excluded_modules)}}


def write_configs(src_config: dict, plan: Plan, dst: Path) -> None:
    if plan.family == "v4":
        from dsquant.convert.v4_config import write_v4_configs

        return write_v4_configs(src_config, plan, dst)
    cfg = {k: v for k, v in src_config.items() if k != "quantization_config"}  # no stale FP8 config
    cfg["quantization_config"] = quantization_config(plan)
    write_json_atomic(dst / "config.json", cfg)
    if plan.convention == "modelopt":
        write_json_atomic(dst / HF_QUANT_CONFIG, hf_quant_config(plan))


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, generation config, code and license files at the top of SRC (symlinks followed)."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not _SKIP.fullmatch(path.name):
            shutil.copyfile(path, dst / path.name)
            copied.append(path.name)
    return copied


def recipe_record(plan: Plan, source: dict, bytes_out: int, created: str, calibrated: bool) -> dict:
    """dsquant_recipe.json: what made this checkpoint, from what, and what was left out and why."""
    kept = set(plan.excluded_modules)
    counts = Counter(j.fmt if j.action in CONVERTING else "bf16" for j in plan.jobs()
                     if j.action in CONVERTING or j.module in kept)
    excluded = [{"pattern": i.match, "reason": i.reason} for i in plan.recipe.ignore]
    excluded += [{"pattern": r.match, "reason": r.reason} for r in plan.recipe.rules if not get(r.format).quantized]
    return {
        "dsquant_version": dsquant.__version__,
        "recipe": {"name": plan.recipe.name, "version": plan.recipe.version, "resolved": plan.recipe.to_dict()},
        "convention": plan.convention,
        "source": source,
        "created": created,
        "bytes_in": plan.bytes_in,
        "bytes_out": bytes_out,
        "tensors": dict(sorted(counts.items())),
        "excluded": excluded,
        "activation_scales": "calibrated" if calibrated else "default",
        **({"results": plan.results} if plan.results else {}),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
