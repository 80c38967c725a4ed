"""Fused partners must share one scheme and, for NVFP4, one global scale (formats.md section 8.4).

vLLM and SGLang fuse gate_proj + up_proj (dense, shared expert, every routed expert) and
q_a_proj + kv_a_proj_with_mqa into one GEMM; TensorRT-LLM concatenates them.
- fused-scheme: the partners are stored in different formats. vLLM raises "Found a different
  quantization schemes for [...]"; TRT-LLM cannot concatenate them. Error.
- fused-global-scale: NVFP4 partners with different weight global scales (`weight_scale_2` /
  `weight_global_scale`) or activation global scales (`input_scale` / `input_global_scale`).
  TRT-LLM asserts ("The weight_scale_2 should be same for all the weights"); vLLM and SGLang use
  one value for both halves and silently corrupt the other (vLLM issue #54974). Error.
"""

from __future__ import annotations

import math

from dsquant.check.finding import Finding
from dsquant.check.names import module_format
from dsquant.checkpoint.names import DEFAULT_FUSED_GROUPS, expert_index, layer_index
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.registry import find

GLOBAL_PARAMS = (("weight_scale_2", "weight_global_scale"), ("input_scale", "input_global_scale"))
MAX_LISTED = 3


def fused_pairs(view: Checkpoint) -> list[tuple[str, str]]:
    """(first, second) module names of every fused pair present in the checkpoint."""
    pairs = []
    for module in view.modules:
        parent, _, leaf = module.rpartition(".")
        for first, second in DEFAULT_FUSED_GROUPS:
            if leaf == first and f"{parent}.{second}" in view.modules:
                pairs.append((module, f"{parent}.{second}"))
    return sorted(pairs)


def _value(view: Checkpoint, name: str) -> float | None:
    info = view.infos.get(name)
    if info is None or math.prod(info.shape) != 1:
        return None
    return view.read_scalar(name)


def check(view: Checkpoint) -> list[Finding]:
    scheme_bad: list[str] = []
    scale_bad: list[str] = []
    for a, b in fused_pairs(view):
        fa, fb = module_format(view.modules[a]), module_format(view.modules[b])
        if fa != fb:
            scheme_bad.append(f"{a} is {fa} but {b.rsplit('.', 1)[-1]} is {fb}")
            continue
        entry = find(fa)
        if entry is None or not entry.has_global_scale or not view.can_read_values:
            continue
        for names in GLOBAL_PARAMS:
            for pname in names:
                va, vb = _value(view, f"{a}.{pname}"), _value(view, f"{b}.{pname}")
                if va is not None and vb is not None and va != vb and not (math.isnan(va) and math.isnan(vb)):
                    scale_bad.append(f"{a}.{pname} = {va:.6g} vs {b.rsplit('.', 1)[-1]} {vb:.6g}")
    findings = _moe_uniform(view)
    if scheme_bad:
        findings.append(Finding(
            "fused-scheme", "error",
            f"{len(scheme_bad)} fused pair(s) with different schemes (engines fuse them into one layer and require "
            f"one scheme; exclude both or neither): {'; '.join(scheme_bad[:MAX_LISTED])}",
            tensor=scheme_bad[0].split()[0]))
    if scale_bad:
        findings.append(Finding(
            "fused-global-scale", "error",
            f"{len(scale_bad)} fused NVFP4 pair(s) with different global scales (TensorRT-LLM asserts equality; "
            f"vLLM/SGLang use one value for both and corrupt the other half): {'; '.join(scale_bad[:MAX_LISTED])}",
            tensor=scale_bad[0].split()[0]))
    return findings


def _moe_uniform(view: Checkpoint) -> list[Finding]:
    per_layer: dict[int, dict[str, list[str]]] = {}
    for module, params in view.modules.items():
        if expert_index(module) is None:
            continue
        fmt = module_format(params)
        if fmt is not None:
            per_layer.setdefault(layer_index(module), {}).setdefault(fmt, []).append(module)
    mixed = [(layer, fmts) for layer, fmts in sorted(per_layer.items(), key=lambda kv: kv[0] or 0) if len(fmts) > 1]
    if not mixed:
        return []
    layer, fmts = mixed[0]
    counts = ", ".join(f"{len(ms)} {f} (e.g. {ms[0]})" for f, ms in sorted(fmts.items(), key=lambda kv: -len(kv[1])))
    rarest = min(fmts.values(), key=len)[0]
    return [Finding("moe-uniform", "error", f"{len(mixed)} MoE layer(s) mix expert formats; engines build one fused "
                    f"MoE with one scheme per layer. Layer {layer}: {counts}", tensor=rarest)]
