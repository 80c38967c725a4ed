"""The MoE router stays high precision (formats.md 1.2 and 8.10).

- router-dtype: `mlp.gate.weight` stored quantized (error: vLLM builds the router without a quant
  config) or in a float type other than BF16 (warning).
- router-bias: `e_score_correction_bias` not float32. Engines load it: vLLM (`DeepseekV2MoE` in
  vllm/model_executor/models/deepseek_v2.py) and SGLang (`MoEGate` in python/sglang/srt/models/deepseek_v2.py)
  create the parameter in float32 and the default weight loader casts the stored values into it (SGLang even
  keeps it BF16 for ModelOpt FP4 on its FlashInfer TRT-LLM MoE backend). But the stored values carry the
  rounding: BF16 has steps of 2^-6 at DeepSeek's bias magnitudes (~2-8) while the gaps between experts'
  scores are far smaller, so top-k selection can differ from the float32 original. Warning. Missing while
  `topk_method` is `noaux_tc`: both engines create the parameter with `torch.empty` and route with whatever
  memory it holds. Error.
"""

from __future__ import annotations

from dsquant.check.finding import Finding
from dsquant.check.names import FLOAT_FORMATS, SCALE_PARAMS, is_quantized, module_format
from dsquant.checkpoint.reader import Checkpoint

MAX_LISTED = 3


def _finding(rule: str, severity: str, lead: str, names: list[str]) -> Finding:
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return Finding(rule, severity, f"{lead}: {', '.join(names[:MAX_LISTED])}{more}", tensor=names[0])


def check(view: Checkpoint) -> list[Finding]:
    quantized, not_bf16, bias_bad, bias_missing = [], [], [], []
    noaux = (view.config or {}).get("topk_method") == "noaux_tc"
    for module, params in view.modules.items():
        if not module.endswith(".mlp.gate"):
            continue
        fmt = module_format(params)
        if is_quantized(fmt) or any(p in SCALE_PARAMS for p in params):
            quantized.append(f"{module}.weight ({fmt})")
        elif fmt is not None and fmt != FLOAT_FORMATS["BF16"]:
            not_bf16.append(f"{module}.weight ({fmt})")
        bias = params.get("e_score_correction_bias")
        if bias is not None and bias.st_dtype != "F32":
            bias_bad.append(f"{bias.name} ({bias.st_dtype})")
        elif bias is None and noaux and fmt is not None:
            bias_missing.append(f"{module}.e_score_correction_bias")
    out = []
    if quantized:
        out.append(_finding("router-dtype", "error", "router weights stored quantized; engines build the router "
                            "unquantized (keep mlp.gate BF16 and exclude it with a full name)", quantized))
    if not_bf16:
        out.append(_finding("router-dtype", "warning", "router weights not BF16", not_bf16))
    if bias_bad:
        out.append(_finding("router-bias", "warning", "e_score_correction_bias is not float32; vLLM and SGLang "
                            "load it into a float32 parameter, but its values keep the lower precision, which can "
                            "change which experts are selected (store the source's float32 values)", bias_bad))
    if bias_missing:
        out.append(_finding("router-bias", "error", "topk_method is noaux_tc but the routing bias is missing; "
                            "engines would route with an uninitialized bias", bias_missing))
    return out
