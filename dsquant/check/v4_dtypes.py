"""DeepSeek-V4 dtypes and scale grids per tensor, by what vLLM, SGLang and transformers load (deepseek-v4.md 1, 3).

The experts' format decides the rest. vLLM `vllm/models/deepseek_v4/quant_config.py` (DeepseekV4FP8Config) reads
`expert_dtype` from config.json (missing = "fp4", anything but fp4 / fp8 raises ValueError): "fp4" builds
Mxfp4MoEMethod (or ModelOptNvFp4FusedMoE when quantization_config.moe_quant_algo is "NVFP4") and expects the dense
FP8 scales as E8M0 (`is_scale_e8m0 = expert_dtype == "fp4"`); "fp8" builds Fp8MoEMethod with float32 block scales
and expects float32 dense scales.

- v4-expert-dtype: the routed experts are stored in another format than config.json's expert_dtype makes engines
  build (FP8 experts without `expert_dtype: "fp8"` are read as MXFP4; NVFP4 experts need expert_dtype fp4 and
  moe_quant_algo NVFP4), an unsupported expert_dtype, or backbone experts in several formats. Error. Under a
  compressed-tensors quantization_config the experts' method comes from its config groups (v4_config checks them),
  so only the formats' agreement is checked.
- v4-draft-experts: draft (mtp.*) experts in another format than the backbone's: engines dispatch one expert
  method from the config unless its ignore list exempts the draft (NVIDIA keeps DSpark MXFP4 that way). Warning.
- v4-scale-dtype: a dense FP8 `.scale` not in the dtype that goes with the experts (E8M0 beside FP4, F32 beside
  FP8), or an FP8 expert's scale not F32; under compressed-tensors every FP8 `weight_scale` is F32 (its
  float-quantized block format, which vLLM's CompressedTensorsW8A8Fp8 loads). Error.
- v4-scale-grid: an FP8 weight without its `.scale`, or a scale grid other than [ceil(N/128), ceil(K/128)]
  (FP8) / [N, K/32] (FP4 experts) / [N, K/16] (NVFP4 experts). Error.
- v4-unquantized: a tensor that must stay as the release stores it (names_v4.KEEP says why for each: compressor
  wkv / wgate, indexer weights_proj, router, hc_*, attn_sink, ape, gate.bias, tid2eid, norms, embed, head, DSpark
  heads) stored quantized, or a float32 one stored narrower (error); another dtype otherwise (warning).
- v4-quantized: a linear the release quantizes stored in BF16 while the quantization config neither excludes it
  nor leaves it out: engines build an FP8 layer and find no scale for it. Error.
"""

from __future__ import annotations

from collections import Counter

from dsquant.check.declared import declared_quantized
from dsquant.check.finding import Collector, Finding
from dsquant.check.names import FP8_DTYPES, SCALE_PARAMS, is_quantized, module_format
from dsquant.check.v4_layout import expected, module_of
from dsquant.checkpoint.names_v4 import (
    ENGINE_DEFAULT_EXPERT_DTYPE,
    EXPERT_DTYPES,
    STORED_DTYPE,
    dense_scale_dtype,
    expert_dtype,
    keep_reason,
)
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.registry import CONVENTIONS, find


def check(view: Checkpoint) -> list[Finding]:
    try:
        specs = expected(view)
    except (KeyError, ValueError, TypeError):
        return []  # v4_layout reports it
    out = Collector()
    declared = expert_dtype(view.config)
    engine = declared if declared in EXPERT_DTYPES else ENGINE_DEFAULT_EXPERT_DTYPE
    if is_compressed_tensors(view):
        engine = "compressed-tensors"
    experts: dict[str, Counter] = {"backbone": Counter(), "draft": Counter()}
    for spec in specs:
        params = view.modules.get(module_of(spec), {}) if spec.name.endswith(".weight") else {}
        if spec.kind in ("fp8", "expert"):
            fmt = module_format(params) if "weight" in params or "weight_packed" in params else None
            if fmt is None:
                continue
            if spec.kind == "expert":
                experts["draft" if spec.name.startswith("mtp.") else "backbone"][fmt] += 1
            _grid(out, view, spec, params, fmt, engine)
        else:
            _kept(out, view, spec, params)
    return out.findings(LEAD) + _expert_dtype(view, declared, engine, experts)


LEAD = {
    "v4-scale-dtype": "scale(s) in a dtype engines do not load beside these experts",
    "v4-scale-grid": "weight(s) without the scale grid their format needs",
    "v4-unquantized": "tensor(s) stored otherwise than the release, which engines need as it is",
    "v4-quantized": "linear(s) stored BF16 while quant_method fp8 makes engines build FP8 layers with scales "
                    "(quantize them, or list them in quantization_config.ignored_layers)",
}


def is_compressed_tensors(view: Checkpoint) -> bool:
    return (view.quantization_config or {}).get("quant_method") == "compressed-tensors"


def _grid(out: Collector, view: Checkpoint, spec, params, fmt: str, engine: str) -> None:
    w = params.get("weight") or params["weight_packed"]
    n, k = spec.shape
    if fmt == "fp8-noscale":
        out.add("v4-scale-grid", "error", w.name, f"{w.name} ({w.st_dtype}) has no .scale")
        return
    if not is_quantized(fmt):
        if view.quantization_config is not None and declared_quantized(view, module_of(spec)) is not False:
            out.add("v4-quantized", "error", w.name, f"{w.name} ({w.st_dtype})")
        return
    entry = find(fmt)
    if entry is None or fmt not in CONVENTIONS["deepseek-v4"].layouts:
        return  # not a format V4 loaders read: v4-expert-dtype names it
    scale = params.get("scale", params.get("weight_scale"))  # V4's `.scale`, compressed-tensors' `weight_scale`
    if entry.has_global_scale:  # ModelOpt's NVFP4 names: the block scale is weight_scale
        scale = params.get("weight_scale")
    if scale is None:
        return
    if entry.block_grid:
        want_grid = entry.scale_shape((n, k))
        ct = engine == "compressed-tensors"
        want_dtype = dense_scale_dtype(engine) if spec.kind == "fp8" and not ct else "F32"
        if scale.st_dtype != want_dtype:
            why = ("compressed-tensors float-quantized blocks carry float32 scales" if ct else
                   f"expert_dtype {engine!r} makes vLLM load dense scales as {want_dtype}" if spec.kind == "fp8"
                   else "vLLM's Fp8MoEMethod loads FP8 expert scales as F32")
            out.add("v4-scale-dtype", "error", scale.name, f"{scale.name} is {scale.st_dtype} ({why})")
    else:  # one scale per group of K, [N, K/group]
        want_grid = (n, k // entry.block[1])
    if tuple(scale.shape) != want_grid:
        out.add("v4-scale-grid", "error", scale.name, f"{scale.name} is {list(scale.shape)}, expected "
                f"{list(want_grid)} for the [{n}, {k}] weight ({fmt})")


def _kept(out: Collector, view: Checkpoint, spec, params) -> None:
    info = params.get("weight") if spec.name.endswith(".weight") else view.infos.get(spec.name)
    if info is None:
        return
    want = STORED_DTYPE[spec.kind]
    scales = [p for p in params if p in SCALE_PARAMS or p == "scale"]
    why = keep_reason(spec.name) or "the release stores it so"
    if scales or info.st_dtype in FP8_DTYPES or info.st_dtype in ("I8", "U8") and want != "I64":
        out.add("v4-unquantized", "error", info.name, f"{info.name} is stored quantized ({info.st_dtype}"
                f"{', ' + ', '.join(scales) if scales else ''}); keep it {want}: {why}")
    elif info.st_dtype != want:
        severity = "error" if want == "F32" else "warning"
        out.add("v4-unquantized", severity, info.name,
                f"{info.name} is {info.st_dtype}, the release stores {want}: {why}")


def _expert_dtype(view: Checkpoint, declared, engine: str, experts: dict[str, Counter]) -> list[Finding]:
    out = []
    if declared is not None and declared not in EXPERT_DTYPES:
        out.append(Finding("v4-expert-dtype", "error", f"expert_dtype {declared!r} is not one of {EXPERT_DTYPES}; "
                           "vLLM raises ValueError('Unsupported DeepSeek V4 expert_dtype')", file="config.json"))
        return out
    backbone = experts["backbone"]
    quantized = {f for f in backbone if is_quantized(f)}
    if len(backbone) > 1:
        out.append(Finding("v4-expert-dtype", "error", f"routed experts are stored in several formats "
                           f"({dict(backbone)}); engines build every expert with one method", file="config.json"))
        return out
    if not backbone:
        return out
    fmt = next(iter(backbone))
    if engine == "compressed-tensors":
        return out
    entry = find(fmt)
    need, algo = (entry.expert_dtype, entry.modelopt_algo) if entry is not None else (None, None)
    said = f"expert_dtype {declared!r}" if declared is not None else f"no expert_dtype (vLLM assumes {engine!r})"
    if need is None and (quantized or view.quantization_config is not None):
        out.append(Finding("v4-expert-dtype", "error", f"routed experts are stored as {fmt}, which DeepSeek-V4 "
                           "loaders do not read under a quantization_config (vLLM: MXFP4 or NVFP4 with expert_dtype "
                           "fp4, FP8 blocks with fp8)", file="config.json"))
    elif need is None:
        pass  # an unquantized checkpoint: engines build BF16 experts
    elif need != engine:
        out.append(Finding("v4-expert-dtype", "error", f"routed experts are stored as {fmt} but config.json has "
                           f"{said}, so vLLM builds {'MXFP4' if engine == 'fp4' else 'FP8'} experts: set "
                           f"\"expert_dtype\": \"{need}\" in config.json", file="config.json"))
    elif algo is not None and str((view.quantization_config or {}).get("moe_quant_algo", "")).upper() != algo:
        out.append(Finding("v4-expert-dtype", "error", "routed experts are NVFP4 but quantization_config has no "
                           "\"moe_quant_algo\": \"NVFP4\"; vLLM and SGLang then build MXFP4 experts",
                           file="config.json"))
    draft = {f for f in experts["draft"] if f != fmt}
    if draft:
        out.append(Finding("v4-draft-experts", "warning", f"draft experts are stored as {sorted(draft)}, the "
                           f"backbone's as {fmt}: engines build draft experts from the same config unless its "
                           "ignore list exempts mtp.* (as NVIDIA's NVFP4 releases do for the MXFP4 DSpark draft)",
                           file="config.json"))
    return out
