"""DeepSeek-V4 config.json: the quantization config engines dispatch on (deepseek-v4.md 1.6, 3.1).

- v4-quant-config: FP8 / FP4 tensors without a quantization_config, a quant_method other than "fp8" (vLLM's
  DeepseekV4FP8Config in `vllm/models/deepseek_v4/quant_config.py` claims V4 checkpoints by quant_method fp8; SGLang
  reads the same config), weight_block_size other than [128, 128] (the grids every V4 loader tiles; V4.1's [32, 32]
  is another architecture), or activation_scheme other than "dynamic". Error.
- v4-hf-quant-config: NVFP4 routed experts in NVIDIA's hybrid layout (deepseek-v4.md 3.3) without hf_quant_config.json
  (warning: SGLang's HybridFp8NvFp4Config reads group_size and the exclude list from it, TensorRT-LLM its per-layer
  formats); or a hf_quant_config.json without quantization.quant_algo, group_size or a non-empty exclude_modules
  (vLLM requires the keys), or whose MIXED_PRECISION quantized_layers disagree with the NVFP4 modules stored
  (TensorRT-LLM builds each layer as listed). Error.
- v4-ct-config: a compressed-tensors quantization_config (vLLM's CompressedTensorsConfig path for V4, as
  RedHatAI/DeepSeek-V4-Flash-NVFP4-FP8) whose config groups target a tensor engines need unquantized (vLLM builds the
  compressor's fused_wkv_wgate and the indexer's weights_proj with quant_config=None:
  vllm/models/deepseek_v4/compressor.py, attention.py DeepseekV4Indexer), leave a stored quantized linear without a
  group (vLLM: "Unable to find matching target"; the library leaves it unquantized), or give it a group whose
  format is not the one stored. Error.
- tokenizer-missing: no tokenizer file beside the weights; engines need --tokenizer to start. Warning.
"""

from __future__ import annotations

from dsquant.check.config import TOKENIZER_FILES
from dsquant.check.declared import ct_scheme
from dsquant.check.finding import Collector, Finding
from dsquant.check.names import is_quantized, module_format
from dsquant.checkpoint.index import HF_QUANT_CONFIG as HQ
from dsquant.checkpoint.names_v4 import keep_reason
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.registry import CONVENTIONS, find

CFG = "config.json"


def check(view: Checkpoint) -> list[Finding]:
    out = []
    if not set(TOKENIZER_FILES) & view.folder_files():
        out.append(Finding("tokenizer-missing", "warning", f"none of {', '.join(TOKENIZER_FILES)} is present; "
                           "vLLM and SGLang need --tokenizer to start (copy the source's tokenizer files)"))
    qc = view.quantization_config
    if (qc or {}).get("quant_method") != "compressed-tensors":  # NVIDIA's hybrid layout: fp8 config + ModelOpt file
        out += _hf_quant_config(view)
    quantized = sorted(m for m, p in view.modules.items() if is_quantized(module_format(p)))
    if qc is None:
        if quantized:
            out.append(Finding("v4-quant-config", "error", f"{len(quantized)} module(s) are stored quantized (e.g. "
                               f"{quantized[0]}) but config.json has no quantization_config: engines build BF16 "
                               "layers and cannot load them", file=CFG))
        return out
    if qc.get("quant_method") == "compressed-tensors":
        return out + _compressed_tensors(view, qc)
    problems = []
    if qc.get("quant_method") != "fp8":
        problems.append(f"quant_method is {qc.get('quant_method')!r}; DeepSeek-V4 loaders (vLLM DeepseekV4FP8Config, "
                        "SGLang) dispatch on \"fp8\"")
    if qc.get("weight_block_size") != [128, 128]:
        problems.append(f"weight_block_size is {qc.get('weight_block_size')!r}; V4 grids are [128, 128]")
    if qc.get("activation_scheme") != "dynamic":
        problems.append(f"activation_scheme is {qc.get('activation_scheme')!r}; V4 quantizes activations "
                        "dynamically (\"dynamic\")")
    out += [Finding("v4-quant-config", "error", f"quantization_config: {p}", file=CFG) for p in problems]
    return out


def _compressed_tensors(view: Checkpoint, qc: dict) -> list[Finding]:
    out = Collector()
    for module, params in sorted(view.modules.items()):
        fmt = module_format(params)
        if fmt is None:
            continue
        group = ct_scheme(qc, module)
        why = keep_reason(module + ".weight")
        if why and group is not None:
            out.add("v4-ct-config", "error", module, f"{module} (a config group targets it; keep it unquantized "
                    f"and list it in ignore: {why})")
        elif is_quantized(fmt) and group is None:
            out.add("v4-ct-config", "error", module, f"{module} ({fmt}, no config group)")
        elif is_quantized(fmt) and group.get("format") != _ct_format(fmt):
            out.add("v4-ct-config", "error", module, f"{module} (stored {fmt}, its group says "
                    f"{group.get('format')!r})")
    return out.findings({"v4-ct-config": "module(s) the compressed-tensors config groups and ignore list do not "
                                         "describe as stored"})


def _ct_format(fmt: str) -> str | None:
    """The compressed-tensors format of the config group that must target a module stored as `fmt` (a format
    DeepSeek-V4 checkpoints hold), else None."""
    entry = find(fmt)
    return entry.ct_format if entry is not None and fmt in CONVENTIONS["deepseek-v4"].layouts else None


def _modelopt_algo(fmt: str | None) -> str | None:
    entry = find(fmt)
    return entry.modelopt_algo if entry is not None else None


def _hf_quant_config(view: Checkpoint) -> list[Finding]:
    nvfp4 = sorted(m for m, p in view.modules.items() if _modelopt_algo(module_format(p)) is not None)
    hq = view.hf_quant_config
    if hq is None:
        return [Finding("v4-hf-quant-config", "warning", f"{len(nvfp4)} NVFP4 module(s) but no {HQ}: SGLang reads "
                        "group_size and exclude_modules from it and TensorRT-LLM the per-layer formats (write it as "
                        "NVIDIA's V4 NVFP4 releases do)", file=HQ)] if nvfp4 else []
    q = hq.get("quantization")
    if not isinstance(q, dict):
        return [Finding("v4-hf-quant-config", "error", "no 'quantization' object", file=HQ)]
    problems = [f"quantization.{key} is missing or empty" for key in ("quant_algo", "exclude_modules")
                if not q.get(key)]
    if nvfp4 and not q.get("group_size"):
        problems.append("quantization.group_size is missing (16 for NVFP4)")
    layers = q.get("quantized_layers")
    if isinstance(layers, dict) and str(q.get("quant_algo")).upper() == "MIXED_PRECISION":
        listed_nvfp4 = {m for m, v in layers.items() if str((v or {}).get("quant_algo", "")).upper() == "NVFP4"}
        unlisted = sorted(set(nvfp4) - listed_nvfp4)
        stray = sorted(listed_nvfp4 - set(nvfp4))
        if unlisted:
            problems.append(f"quantized_layers lacks {len(unlisted)} stored NVFP4 module(s), e.g. {unlisted[0]}")
        if stray:
            problems.append(f"quantized_layers lists {len(stray)} module(s) as NVFP4 that are not stored NVFP4, "
                            f"e.g. {stray[0]}")
    return [Finding("v4-hf-quant-config", "error", p, file=HQ) for p in problems]
