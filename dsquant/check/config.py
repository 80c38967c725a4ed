"""Config-file rules: config.json / hf_quant_config.json against each other and against the tensors.

- config-missing / not-deepseek: no config.json (error), or an architecture these rules do not know
  (warning: the tensor-name rules assume DeepSeek naming).
- stale-quant-config: config.json declares a different format than the tensors hold (an FP8 source
  config left beside NVFP4 weights), or disagrees with hf_quant_config.json. SGLang reads
  hf_quant_config.json only when config.json has no quantization_config, vLLM reads config.json,
  TRT-LLM prefers hf_quant_config.json: the engines would load different formats (formats.md 8.7). Error.
- missing-quant-config: quantized tensors and no quantization config anywhere, or a config that
  declares quantization over unquantized tensors. Error.
- hf-quant-config-keys: `quant_algo`, `group_size`, `kv_cache_quant_algo` and a non-empty
  `exclude_modules` must be present in hf_quant_config.json (vLLM requires the keys; older SGLang
  rejects empty or null values). Error, or warning for a null kv_cache_quant_algo.
- quant-config-keys: `quant_method: fp8` needs `activation_scheme: dynamic` and `weight_block_size`
  for block weights; compressed-tensors needs `config_groups`. Error. A compressed-tensors NVFP4 group whose
  input activations are not `dynamic: "local"` (the library's NVFP4 preset: per-16 scales computed at run
  time under the static `input_global_scale`): vLLM picks its W4A4 NVFP4 scheme from type, bits, strategy
  and group size alone and loads it (`_is_fp4a4_nvfp4` in vllm/model_executor/layers/quantization/
  compressed_tensors/compressed_tensors.py), but compressed-tensors and transformers then expect a static
  per-group `input_scale` and fail to load. Warning.
- declared-format: a module stored in another format family than the config group (compressed-tensors)
  or per-layer entry (ModelOpt MIXED_PRECISION `quantized_layers`) that applies to it. Error.
- tokenizer-missing: no tokenizer file beside the weights; engines fail at start-up unless given
  `--tokenizer`. Warning.
- config-layout: config.json states a field in both the transformers < 5 layout (`rope_theta`,
  `rope_scaling`, `torch_dtype`) and the transformers >= 5 one (`rope_parameters`, `dtype`) with different
  values (dsquant.runner.config.layout_disagreements). Which one an engine uses depends on the transformers
  version it parses the config with, and `dsquant eval` refuses it. Warning.
"""

from __future__ import annotations

from dsquant.check.declared import ct_group
from dsquant.check.finding import Finding
from dsquant.check.names import is_quantized, module_format
from dsquant.checkpoint.index import HF_QUANT_CONFIG as HQ
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.registry import find
from dsquant.runner.config import layout_disagreements

DEEPSEEK_ARCHS = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "tokenizer_config.json")


def stored_families(view: Checkpoint) -> set[str]:
    """Format families of the quantized modules: fp8, int8, nvfp4, mxfp4, int-packed, ..."""
    fams = set()
    for params in view.modules.values():
        fmt = module_format(params)
        if is_quantized(fmt):
            fams.add(fmt.split("-")[0] if fmt.startswith(("fp8", "int8")) else fmt)
    return fams


def _algo_family(algo: str) -> str | None:
    algo = algo.upper()
    if "NVFP4" in algo:
        return "nvfp4"
    if "MXFP4" in algo:
        return "mxfp4"
    if "FP8" in algo:
        return "fp8"
    if "INT8" in algo or "W8A8" in algo:
        return "int8"
    return None


def _args_family(args: dict) -> str | None:
    bits, kind, group = args.get("num_bits"), args.get("type"), args.get("group_size")
    if bits == 4 and kind == "float":
        return "mxfp4" if group == 32 else "nvfp4"
    if bits == 8:
        return "fp8" if kind == "float" else "int8"
    if bits in (2, 3, 4) and kind == "int":
        return "int-packed"
    return None


def declared_families(view: Checkpoint) -> tuple[set[str], str] | None:
    """(families, where) that config.json declares, or that hf_quant_config.json does when config.json is silent."""
    qc = view.quantization_config
    if qc is not None:
        method = str(qc.get("quant_method", ""))
        if method == "fp8":
            return {"fp8"}, "config.json"
        if method in ("blockwise_int8", "w8a8_int8"):
            return {"int8"}, "config.json"
        if method == "mxfp4":
            return {"mxfp4"}, "config.json"
        if method.startswith("modelopt"):
            fam = _algo_family(str(qc.get("quant_algo", "")))
            return ({fam} if fam else set()), "config.json"
        if method == "compressed-tensors":
            fams = set()
            for group in (qc.get("config_groups") or {}).values():
                fam = _args_family((group or {}).get("weights") or {})
                fams |= {fam} if fam else set()
            return fams, "config.json"
        return set(), "config.json"
    hq = (view.hf_quant_config or {}).get("quantization")
    if isinstance(hq, dict):
        fams = {_algo_family(str(hq.get("quant_algo", "")))}
        for layer in (hq.get("quantized_layers") or {}).values():
            fams.add(_algo_family(str((layer or {}).get("quant_algo", ""))))
        return fams - {None}, HQ
    return None


def check(view: Checkpoint) -> list[Finding]:
    if view.config is None:
        return [Finding("config-missing", "error", "no config.json; engines cannot build the model",
                        file="config.json")]
    findings = []
    archs = view.config.get("architectures") or []
    if not any(a in DEEPSEEK_ARCHS for a in archs):
        findings.append(Finding("not-deepseek", "warning", f"architectures {archs} is not a DeepSeek V2/V3 model; "
                                "the tensor-name rules assume DeepSeek naming", file="config.json"))
    if not set(TOKENIZER_FILES) & view.folder_files():
        findings.append(Finding("tokenizer-missing", "warning", f"none of {', '.join(TOKENIZER_FILES)} is present; "
                                "vLLM and SGLang need --tokenizer to start (copy the source's tokenizer files)"))
    findings += [Finding("config-layout", "warning", f"{phrase}: the value an engine uses depends on its "
                         "transformers version; keep one layout", file="config.json")
                 for _, phrase in layout_disagreements(view.config)]
    findings += _agreement(view)
    findings += _per_module(view)
    findings += _hq_keys(view)
    findings += _qc_keys(view)
    return findings


def _agreement(view: Checkpoint) -> list[Finding]:
    out = []
    qc, hq = view.quantization_config, view.hf_quant_config
    method = str((qc or {}).get("quant_method", ""))
    if hq is not None and qc is not None and not method.startswith("modelopt"):
        out.append(Finding("stale-quant-config", "error",
                           f"config.json declares quant_method {method!r} while {HQ} declares ModelOpt "
                           f"{(hq.get('quantization') or {}).get('quant_algo')!r}: vLLM and SGLang follow config.json, "
                           "TensorRT-LLM follows hf_quant_config.json", file="config.json"))
    elif hq is not None and qc is not None:
        nested = hq.get("quantization") or {}
        a, b = qc.get("quant_algo"), nested.get("quant_algo")
        if a is not None and b is not None and a != b:
            out.append(Finding("stale-quant-config", "error", f"config.json quant_algo {a!r} != {HQ} quant_algo {b!r}",
                               file="config.json"))
        flat, deep = qc.get("ignore", qc.get("exclude_modules")), nested.get("exclude_modules")
        if isinstance(flat, list) and isinstance(deep, list) and sorted(map(str, flat)) != sorted(map(str, deep)):
            only_flat = sorted(set(map(str, flat)) - set(map(str, deep)))
            only_deep = sorted(set(map(str, deep)) - set(map(str, flat)))
            out.append(Finding("stale-quant-config", "warning", "config.json's exclude list differs from "
                               f"{HQ}'s (vLLM reads the first, TensorRT-LLM the second): only in config.json "
                               f"{only_flat[:3]}, only in {HQ} {only_deep[:3]}", file="config.json"))
    stored = stored_families(view)
    declared = declared_families(view)
    if declared is None:
        if stored:
            out.append(Finding("missing-quant-config", "error", f"tensors are stored as {sorted(stored)} but neither "
                               f"config.json nor {HQ} declares any quantization", file="config.json"))
        return out
    fams, where = declared
    if not stored:
        out.append(Finding("missing-quant-config", "error", f"{where} declares quantization ({sorted(fams)}) but no "
                           "tensor is stored quantized", file=where))
    elif fams and not stored <= fams:
        out.append(Finding("stale-quant-config", "error", f"{where} declares {sorted(fams)} but tensors are stored as "
                           f"{sorted(stored)} (a source quantization_config left in place?)", file=where))
    return out


def _hq_keys(view: Checkpoint) -> list[Finding]:
    hq = view.hf_quant_config
    if hq is None:
        return []
    q = hq.get("quantization")
    if not isinstance(q, dict):
        return [Finding("hf-quant-config-keys", "error", "no 'quantization' object", file=HQ)]
    out = []
    algo = q.get("quant_algo")
    if not algo:
        out.append(Finding("hf-quant-config-keys", "error", "quantization.quant_algo is missing or empty", file=HQ))
    if "FP4" in str(algo).upper() and not q.get("group_size"):
        out.append(Finding("hf-quant-config-keys", "error", "quantization.group_size is missing or empty (vLLM "
                           "requires it for NVFP4; older SGLang rejects it)", file=HQ))
    if "kv_cache_quant_algo" not in q:
        out.append(Finding("hf-quant-config-keys", "error", "quantization.kv_cache_quant_algo is missing (vLLM "
                           "requires the key; write null or \"FP8\")", file=HQ))
    elif q["kv_cache_quant_algo"] is None:
        out.append(Finding("hf-quant-config-keys", "warning", "quantization.kv_cache_quant_algo is null; older SGLang "
                           "versions reject a null value", file=HQ))
    excl = q.get("exclude_modules")
    if not isinstance(excl, list) or not excl:
        what = "missing" if excl is None else "empty" if isinstance(excl, list) else f"not a list ({excl!r})"
        out.append(Finding("hf-quant-config-keys", "error", f"quantization.exclude_modules is {what}; vLLM requires "
                           "the key, older SGLang rejects an empty list, and a DeepSeek checkpoint always keeps "
                           "lm_head and the router unquantized", file=HQ))
    return out


def _qc_keys(view: Checkpoint) -> list[Finding]:
    qc = view.quantization_config
    if qc is None:
        return []
    method = qc.get("quant_method")
    out = []
    if not method:
        out.append(Finding("quant-config-keys", "error", "quantization_config has no quant_method", file="config.json"))
    if method in ("fp8", "blockwise_int8"):
        if qc.get("activation_scheme") != "dynamic":
            out.append(Finding("quant-config-keys", "error", f"quant_method {method!r} needs activation_scheme "
                               f"'dynamic' for block weights, found {qc.get('activation_scheme')!r}",
                               file="config.json"))
        blocky = any((module_format(p) or "").endswith("-block") for p in view.modules.values())
        if blocky and not qc.get("weight_block_size"):
            out.append(Finding("quant-config-keys", "error", "block-scaled weights but no weight_block_size "
                               "(engines would read them as per-tensor FP8)", file="config.json"))
    if method == "compressed-tensors" and not qc.get("config_groups"):
        out.append(Finding("quant-config-keys", "error", "compressed-tensors config without config_groups",
                           file="config.json"))
    if method == "compressed-tensors":
        for name, group in (qc.get("config_groups") or {}).items():
            inputs = (group or {}).get("input_activations") or {}
            family = find(_args_family(inputs))
            if family is not None and family.has_global_scale and inputs.get("dynamic") != "local":
                out.append(Finding("quant-config-keys", "warning", f"config_groups.{name}.input_activations.dynamic "
                                   f"is {inputs.get('dynamic')!r}; NVFP4 activations are dynamic \"local\" under "
                                   "input_global_scale (compressed-tensors' NVFP4 preset): compressed-tensors and "
                                   "transformers otherwise expect a static per-group input_scale and fail to load",
                                   file="config.json"))
    return out


def _family(fmt: str) -> str:
    return fmt.split("-")[0] if fmt.startswith(("fp8", "int8")) else fmt


def _per_module(view: Checkpoint) -> list[Finding]:
    qc = view.quantization_config or {}
    layers = ((view.hf_quant_config or {}).get("quantization") or {}).get("quantized_layers") or \
        qc.get("quantized_layers")
    ct = qc.get("quant_method") == "compressed-tensors"
    if not ct and not isinstance(layers, dict):
        return []
    bad = []
    for module, params in view.modules.items():
        fmt = module_format(params)
        if not is_quantized(fmt):
            continue
        if ct:
            group = ct_group(qc, module)
            want = _args_family((group or {}).get("weights") or {}) if group else None
        else:
            want = _algo_family(str((layers.get(module) or {}).get("quant_algo", ""))) if module in layers else None
        if want is not None and want != _family(fmt):
            bad.append((module, fmt, want))
    if not bad:
        return []
    listed = "; ".join(f"{m} is {f} but declared {w}" for m, f, w in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return [Finding("declared-format", "error", f"{len(bad)} module(s) stored in another format than the config "
                    f"declares for them: {listed}{more}", tensor=bad[0][0], file="config.json")]
