"""Scale tensors and packed shapes (formats.md sections 2-4 and 8.1-8.3, 8.6, 8.14).

- missing-scale: an FP8/INT8 weight without any scale tensor. Error.
- scale-name: the scale's name does not match the declared convention (`quant_method: fp8` loads
  `weight_scale_inv`; compressed-tensors loads `weight_scale`). Error.
- scale-shape: a block scale that is not [ceil(N/bn), ceil(K/bk)], a channel scale that is not [N, 1],
  or a global / per-tensor scale that is not one float value. Error.
- scale-dtype: a global / per-tensor scale stored as BF16/FP16 instead of float32 (compressed-tensors and
  llm-compressor write FP8 `input_scale` in the model's dtype), or a DeepSeek FP8 `weight_scale_inv` /
  SGLang `w8a8_int8` channel scale likewise. It loads: the engines create these parameters in float32 and
  the weight loader copies (casts) the stored tensor into them (vLLM
  vllm/model_executor/layers/quantization/utils/fp8_utils.py `create_fp8_input_scale` /
  `create_fp8_scale_parameter`, loaded by vllm/model_executor/parameter.py; SGLang's
  python/sglang/srt/layers/quantization/w8a8_int8.py `ChannelQuantScaleParameter` in float32). Warning, as
  the value keeps its stored precision.
- swizzled-block-scale: an NVFP4/MXFP4 block scale stored padded/swizzled (the 128x4 layout engines
  build at load) instead of linear [N, K/16] (or [N, K/32]). Error.
- packed-shape: a stored weight whose (unpacked) shape disagrees with config.json, including FP4
  packed along N instead of K. Error.
- global-scale-value: a global scale that is not finite and positive (error), or whose size says it is
  stored in the other direction (ModelOpt multipliers are amax/2688, compressed-tensors divisors are
  2688/amax; mixing them up gives errors of ~2688^2, formats.md section 8.2). Warning.
- ue8m0-scale: `scale_fmt: ue8m0` declared but block scales are not powers of two. Error.
- activation-scale: an NVFP4 module without the static activation global scale its W4A4 config needs
  (ModelOpt `input_scale`, compressed-tensors `input_global_scale`), or with one that a weight-only
  (W4A16) config has no parameter for. Error.
"""

from __future__ import annotations

import math

import torch

from dsquant.check.finding import Collector, Finding
from dsquant.check.names import expected_shape, fp4_group, logical_shape, module_format
from dsquant.checkpoint.index import TensorInfo
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.registry import find

LEAD = {
    "missing-scale": "quantized weight(s) without a scale tensor",
    "scale-name": "scale tensor name does not match the declared convention",
    "scale-shape": "scale tensor(s) with the wrong shape or dtype",
    "scale-dtype": "scale tensor(s) stored in lower precision than float32",
    "swizzled-block-scale": "block scales stored swizzled/padded; engines expect them linear [N, K/group] and "
    "swizzle at load",
    "packed-shape": "weight shape(s) disagree with config.json",
    "global-scale-value": "suspicious global scale value(s)",
    "ue8m0-scale": "scale_fmt is ue8m0 but block scales are not powers of two",
    "activation-scale": "NVFP4 activation global scales disagree with the declared scheme",
}


def _block_size(view: Checkpoint) -> tuple[int, int]:
    qc = view.quantization_config or {}
    bs = qc.get("weight_block_size")
    if not bs:
        for group in (qc.get("config_groups") or {}).values():
            bs = ((group or {}).get("weights") or {}).get("block_structure") or bs
    if isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs):
        return int(bs[0]), int(bs[1])
    return 128, 128


def _is_pow2(x: torch.Tensor) -> bool:
    x = x.float()
    m, _ = torch.frexp(x)
    return bool(((x > 0) & (m == 0.5)).all())


def check(view: Checkpoint) -> list[Finding]:
    out = Collector()
    qc = view.quantization_config or {}
    method = str(qc.get("quant_method", ""))
    block = _block_size(view)
    ue8m0 = method == "fp8" and qc.get("scale_fmt") == "ue8m0"
    w4a4 = _nvfp4_activations_declared(view)
    for module, params in view.modules.items():
        fmt = module_format(params)
        if fmt is None:
            continue
        entry = find(fmt)
        if entry is not None and entry.has_global_scale and w4a4 is not None:
            _check_activation_scale(out, module, params, w4a4)
        _check_fp8_int8(view, out, module, params, fmt, method, block, ue8m0)
        _check_fp4(out, module, params, fmt)
        _check_globals(view, out, module, params, fmt)
        _check_logical(view, out, module, params, fmt)
    return out.findings(LEAD)


def _check_fp8_int8(view, out, module, params, fmt, method, block, ue8m0) -> None:
    if not fmt.startswith(("fp8", "int8")):
        return
    w = params.get("weight")
    if fmt.endswith("-noscale"):
        out.add("missing-scale", "error", w.name, f"{w.name} ({w.st_dtype}) has no weight_scale_inv / weight_scale")
        return
    if method in ("fp8", "blockwise_int8") and "weight_scale_inv" not in params:
        out.add("scale-name", "error", w.name,
                f"{module} has weight_scale; quant_method {method!r} loads weight_scale_inv")
    if method in ("compressed-tensors", "w8a8_int8") and "weight_scale_inv" in params:
        out.add("scale-name", "error", w.name, f"{module} has weight_scale_inv; {method} loads weight_scale")
    scale: TensorInfo = params.get("weight_scale_inv") or params["weight_scale"]
    if len(w.shape) != 2:
        return
    n, k = w.shape
    if fmt.endswith("-block") and scale.shape == (n,):
        out.add("scale-shape", "error", scale.name, f"{scale.name} is [{n}]; engines expect per-channel scales as "
                f"[{n}, 1] (SGLang's MLA path broadcasts them)")
    elif fmt.endswith("-block"):
        want = (math.ceil(n / block[0]), math.ceil(k / block[1]))
        if scale.shape != want:
            out.add("scale-shape", "error", scale.name, f"{scale.name} is {list(scale.shape)}, expected {list(want)} "
                    f"for a [{n}, {k}] weight in {block[0]}x{block[1]} blocks")
        elif ue8m0 and scale.st_dtype == "F32" and view.can_read_values and not _is_pow2(view.read_tensor(scale.name)):
            out.add("ue8m0-scale", "error", scale.name, scale.name)
    if method in ("fp8", "w8a8_int8") and scale.st_dtype != "F32":
        out.add("scale-dtype", "warning", scale.name, f"{scale.name} is {scale.st_dtype}; engines cast it to float32 "
                "on load, keeping its stored precision")


def _check_fp4(out, module, params, fmt) -> None:
    group = fp4_group(fmt)
    if group is None:
        return
    w = params.get("weight_packed") or params["weight"]
    scale = params.get("weight_scale")
    if scale is None or len(w.shape) != 2:
        if scale is None:
            out.add("missing-scale", "error", w.name, f"{w.name} (packed FP4) has no weight_scale")
        return
    n, k = w.shape[0], w.shape[1] * 2
    want = (n, k // group)
    if scale.shape == want:
        return
    padded = (-(-n // 128) * 128, -(-(k // group) // 4) * 4)
    numel = math.prod(scale.shape)
    if scale.shape == padded or (len(scale.shape) == 1 and numel in (math.prod(padded), math.prod(want))):
        out.add("swizzled-block-scale", "error", scale.name,
                f"{scale.name} is {list(scale.shape)}, expected linear {list(want)}")
    else:
        out.add("scale-shape", "error", scale.name, f"{scale.name} is {list(scale.shape)}, expected {list(want)} "
                f"for packed weight {list(w.shape)} ({fmt}, one scale per {group})")


def _check_globals(view, out, module, params, fmt) -> None:
    entry = find(fmt)
    two_level = entry is not None and entry.has_global_scale  # block scales under a global scale (NVFP4)
    for pname in ("weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale"):
        info = params.get(pname)
        if info is None:
            continue
        if math.prod(info.shape) != 1:
            out.add("scale-shape", "error", info.name, f"{info.name} is {info.st_dtype} {list(info.shape)}, "
                    "expected one float32 value")
            continue
        if info.st_dtype not in ("F32", "BF16", "F16"):
            out.add("scale-shape", "error", info.name, f"{info.name} is {info.st_dtype}, expected a float value")
            continue
        if info.st_dtype != "F32":
            out.add("scale-dtype", "warning", info.name, f"{info.name} is {info.st_dtype}; engines cast it to "
                    "float32 on load, keeping its stored precision")
        if not view.can_read_values:
            continue
        value = view.read_scalar(info.name)
        if not math.isfinite(value) or value <= 0:
            out.add("global-scale-value", "error", info.name, f"{info.name} = {value}")
        elif two_level and pname.endswith("_global_scale") and value < 1.0:
            out.add("global-scale-value", "warning", info.name, f"{info.name} = {value:.3g} looks like a ModelOpt "
                    "multiplier (amax/2688); compressed-tensors stores the divisor 2688/amax")
        elif two_level and pname == "weight_scale_2" and value > 1.0:
            out.add("global-scale-value", "warning", info.name, f"{info.name} = {value:.3g} looks like a "
                    "compressed-tensors divisor (2688/amax); ModelOpt stores the multiplier amax/2688")


def _check_logical(view, out, module, params, fmt) -> None:
    want = expected_shape(module, view.config)
    have = logical_shape(params, fmt)
    if want is None or have is None or tuple(have) == want:
        return
    w = params.get("weight_packed") or params["weight"]
    hint = ""
    if fp4_group(fmt) is not None and tuple(w.shape) == (want[0] // 2, want[1]):
        hint = " (packed along N; FP4 packs two elements per byte along K: [N, K/2])"
    out.add("packed-shape", "error", w.name, f"{w.name} is {w.st_dtype} {list(w.shape)} ({fmt}), config.json implies "
            f"[N, K] = {list(want)}{hint}")


def _nvfp4_activations_declared(view: Checkpoint) -> bool | None:
    """True if the config declares NVFP4 W4A4 (static activation scales), False for W4A16, None if unknown."""
    hq = (view.hf_quant_config or {}).get("quantization") or {}
    qc = view.quantization_config or {}
    algo = str(hq.get("quant_algo") or qc.get("quant_algo") or "").upper()
    if algo:
        return None if "NVFP4" not in algo else not algo.startswith("W4A16")
    if qc.get("quant_method") != "compressed-tensors":
        return None
    for group in (qc.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if weights.get("num_bits") == 4 and weights.get("type") == "float" and weights.get("group_size") == 16:
            return bool((group or {}).get("input_activations"))
    return None


def _check_activation_scale(out, module, params, w4a4: bool) -> None:
    have = [p for p in ("input_scale", "input_global_scale") if p in params]
    w = params.get("weight_packed") or params["weight"]
    if w4a4 and not have:
        out.add("activation-scale", "error", w.name, f"{module} has no input_scale / input_global_scale (W4A4 "
                "declared)")
    elif not w4a4 and have:
        out.add("activation-scale", "error", params[have[0]].name, f"{module}.{have[0]} is stored but the config "
                "declares weight-only NVFP4 (W4A16), which has no parameter for it")
