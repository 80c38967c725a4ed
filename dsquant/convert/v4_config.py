"""config.json and hf_quant_config.json of a converted DeepSeek-V4 checkpoint (deepseek-v4.md 1.6, 3.1-3.3).

config.json keeps the source's fields and its `quant_method: fp8` quantization_config (vLLM's DeepseekV4FP8Config
and SGLang claim V4 checkpoints by it) and changes only what engines dispatch on:

- `expert_dtype`: "fp8" beside FP8 experts, "fp4" beside MXFP4 / NVFP4 ones (vLLM reads it from config.json and
  assumes "fp4" when missing; transformers copies the top-level key into quantization_config, so a copy there is
  kept in step);
- `quantization_config.scale_fmt: "ue8m0"` when the dense scales are E8M0 (they are powers of two);
- NVFP4 experts: `quantization_config.moe_quant_algo: "NVFP4"` (vLLM builds ModelOptNvFp4FusedMoE, SGLang
  HybridFp8NvFp4Config) and `ignore` listing kept draft experts (`mtp.*`), as NVIDIA's NVFP4 releases write; plus
  hf_quant_config.json as ModelOpt's `quantize_to_nvfp4.py` writes it (MIXED_PRECISION, one quantized_layers entry
  per NVFP4 expert projection, its exclude_modules), from which SGLang reads group_size and exclusions.

`--format compressed-tensors` replaces the fp8 quantization_config by a compressed-tensors one (vLLM then loads the
checkpoint through CompressedTensorsConfig, as RedHatAI/DeepSeek-V4-Flash-NVFP4-FP8): one config group per format
with the library preset's arguments (config.compressed_tensors_config) and, as targets and ignore entries,
anchored regexes over the official module names that also name vLLM's module for fused linears (VLLM_MODULE), with
or without vLLM's `model.` prefix. Every BF16 linear is ignored. `expert_dtype` is dropped: it selects
DeepseekV4FP8Config's expert method, which a compressed-tensors checkpoint does not go through, and transformers
would copy it into the compressed-tensors quantization_config.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

import dsquant
from dsquant.checkpoint.index import HF_QUANT_CONFIG, write_json_atomic
from dsquant.checkpoint.names import generalize
from dsquant.checkpoint.names_v4 import blocks
from dsquant.convert.config import compressed_tensors_config
from dsquant.convert.plan import Plan
from dsquant.convert.v4 import CT_CONVENTION, expert_dtype, expert_formats
from dsquant.formats.nvfp4 import NVFP4_BLOCK
from dsquant.formats.registry import get

# ModelOpt's exclude_modules for DeepSeek-V4 (examples/deepseek/deepseek_v4/quantize_to_nvfp4.py)
MODELOPT_V4_EXCLUDE = ["*.attn.*", "*.attn_norm.*", "*.ffn.shared_experts.*", "*.ffn.gate.*", "*.ffn_norm.*",
                       "embed.weight", "head.weight", "*.hc_*", "*.h_proj.*", "*.e_proj.*", "*.enorm.*", "*.hnorm.*",
                       "mtp.*.norm.*", "norm.weight"]
KEPT_DRAFT_EXPERTS = "mtp.*"
# The name vLLM looks a checkpoint linear up by where it differs (vllm/models/deepseek_v4/nvidia/model.py:
# load_weights' stacked_params_mapping and _make_deepseek_v4_weights_mapper; compressor.py fused_wkv_wgate; routed
# experts: compressed_tensors_moe.py get_moe_method asks for the scheme of `<experts>.0.gate_proj / up_proj /
# down_proj`)
VLLM_MODULE = {"attn.wq_a": "attn.fused_wqa_wkv", "attn.wkv": "attn.fused_wqa_wkv",
               "compressor.wkv": "compressor.fused_wkv_wgate", "compressor.wgate": "compressor.fused_wkv_wgate",
               "shared_experts.w1": "shared_experts.gate_up_proj", "shared_experts.w3": "shared_experts.gate_up_proj",
               "shared_experts.w2": "shared_experts.down_proj", "experts.*.w1": "experts.*.gate_proj",
               "experts.*.w3": "experts.*.up_proj", "experts.*.w2": "experts.*.down_proj", "embed": "embed_tokens",
               "head": "lm_head"}
DEFAULT_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128]}


def _expert_dtype(formats: dict[str, str]) -> str:
    backbone = {f for m, f in formats.items() if not m.startswith("mtp.")}
    return expert_dtype(backbone)


def _module_regex(pattern: str) -> str:
    """A generalized official module name -> a compressed-tensors `re:` entry matching it and vLLM's name for it."""
    def esc(text: str) -> str:
        return re.escape(text).replace(r"\*", r"\d+")

    for name, vllm in VLLM_MODULE.items():
        if pattern == name or pattern.endswith("." + name):
            head = pattern[: len(pattern) - len(name)]
            return f"re:^(model\\.)?{esc(head)}({esc(name)}|{esc(vllm)})$"
    return f"re:^(model\\.)?{esc(pattern)}$"


def ct_quantization_config(plan: Plan) -> dict:
    """compressed-tensors quantization_config of a V4 plan: a config group per stored format, BF16 linears ignored."""
    groups: dict[str, set[str]] = {}
    ignore: set[str] = set()
    for job in plan.jobs():
        weight = next((o for o in job.outputs if o[0].endswith((".weight", ".weight_packed"))), None)
        if weight is None or len(weight[2]) != 2:
            continue
        if weight[1] in (torch.bfloat16, torch.float16, torch.float32):  # unquantized: its job is the weight tensor
            ignore.add(_module_regex(generalize(job.module.removesuffix(".weight"))))
        else:
            groups.setdefault(job.fmt, set()).add(_module_regex(generalize(job.module)))
    owners: dict[str, set[str]] = {}
    for fmt, targets in groups.items():
        for t in targets:
            owners.setdefault(t, set()).add(fmt)
    clash = sorted(t for t, fmts in owners.items() if len(fmts) > 1)
    if clash:
        raise ValueError(f"compressed-tensors targets {clash[0]} would hold {sorted(owners[clash[0]])}: linears of "
                         f"one name pattern need one format")
    return compressed_tensors_config({f: sorted(t) for f, t in groups.items()}, sorted(ignore))


def v4_config(src_config: dict, plan: Plan) -> dict:
    """config.json of the output."""
    formats = expert_formats(plan)
    cfg = copy.deepcopy(src_config)
    if "compress_ratios" not in cfg or "num_hash_layers" not in cfg:  # transformers saves layer_types instead
        layers = [b for b in blocks(cfg) if b.draft is None]
        cfg.setdefault("compress_ratios", [b.compress_ratio for b in layers])
        cfg.setdefault("num_hash_layers", sum(b.hash_routing for b in layers))
    if plan.convention == CT_CONVENTION:
        cfg.pop("expert_dtype", None)
        cfg["quantization_config"] = ct_quantization_config(plan)
        return cfg
    if not any(job.action != "rename" and job.action != "copy" or any(n.endswith(".scale") for n, _, _ in job.outputs)
               for job in plan.jobs()):
        return cfg  # nothing quantized (the official-names recipe on transformers' BF16 save)
    qc = dict(cfg.get("quantization_config") or DEFAULT_QUANTIZATION_CONFIG)
    expert = _expert_dtype(formats)
    cfg["expert_dtype"] = expert
    if "expert_dtype" in qc:
        qc["expert_dtype"] = expert
    if expert == "fp4":
        qc["scale_fmt"] = "ue8m0"
    algos = {get(f).modelopt_algo for f in formats.values()} - {None}
    if algos:
        qc["moe_quant_algo"] = algos.pop()
        kept = [m for m, f in formats.items() if get(f).modelopt_algo is None]
        if kept:
            if not all(m.startswith("mtp.") for m in kept):
                raise ValueError(f"{kept[0]}: only draft (mtp.*) experts can stay out of NVFP4 beside NVFP4 experts")
            qc["ignore"] = [KEPT_DRAFT_EXPERTS]
    else:
        qc.pop("moe_quant_algo", None)
    cfg["quantization_config"] = qc
    return cfg


def hf_quant_config(plan: Plan) -> dict:
    formats = expert_formats(plan)
    exclude = list(MODELOPT_V4_EXCLUDE)
    if any(get(f).modelopt_algo is None for f in formats.values()):
        exclude.append(KEPT_DRAFT_EXPERTS + ".ffn.experts.*")
    layers = {m: {"quant_algo": get(f).modelopt_algo, "group_size": NVFP4_BLOCK} for m, f in sorted(formats.items())
              if get(f).modelopt_algo is not None}
    return {"producer": {"name": "dsquant", "version": dsquant.__version__},
            "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "group_size": NVFP4_BLOCK,
                             "quantized_layers": layers, "exclude_modules": exclude}}


def write_v4_configs(src_config: dict, plan: Plan, dst: Path) -> None:
    cfg = v4_config(src_config, plan)
    write_json_atomic(dst / "config.json", cfg)
    if (cfg.get("quantization_config") or {}).get("moe_quant_algo") == "NVFP4":
        write_json_atomic(dst / HF_QUANT_CONFIG, hf_quant_config(plan))
