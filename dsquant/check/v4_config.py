"""DeepSeek-V4 config.json: the quantization config engines dispatch on (deepseek-v4.md 1.6, 3.1).

- v4-quant-config: FP8 / FP4 tensors without a quantization_config, a quant_method other than "fp8" (vLLM's
  DeepseekV4FP8Config in `vllm/models/deepseek_v4/quant_config.py` claims V4 checkpoints by quant_method fp8; SGLang
  reads the same config), weight_block_size other than [128, 128] (the grids every V4 loader tiles; V4.1's [32, 32]
  is another architecture), or activation_scheme other than "dynamic". Error.
- tokenizer-missing: no tokenizer file beside the weights; engines need --tokenizer to start. Warning.
"""

from __future__ import annotations

from dsquant.check.config import TOKENIZER_FILES
from dsquant.check.finding import Finding
from dsquant.check.names import is_quantized, module_format
from dsquant.check.view import CheckpointView

CFG = "config.json"


def check(view: CheckpointView) -> list[Finding]:
    out = []
    if not set(TOKENIZER_FILES) & view.files():
        out.append(Finding("tokenizer-missing", "warning", f"none of {', '.join(TOKENIZER_FILES)} is present; "
                           "vLLM and SGLang need --tokenizer to start (copy the source's tokenizer files)"))
    qc = view.quantization_config
    quantized = sorted(m for m, p in view.modules.items() if is_quantized(module_format(p)))
    if qc is None:
        if quantized:
            out.append(Finding("v4-quant-config", "error", f"{len(quantized)} module(s) are stored quantized (e.g. "
                               f"{quantized[0]}) but config.json has no quantization_config: engines build BF16 "
                               "layers and cannot load them", file=CFG))
        return out
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
