"""The MTP (next-token prediction) layer, id num_hidden_layers on DeepSeek-V3 (formats.md 1.2, 8.9, 8.12).

- mtp-missing: config.json declares num_nextn_predict_layers but the layer is absent (transformers-based
  quantizers drop layer 61 on load): the main model loads, MTP speculative decoding cannot. Warning.
  A layer that is there but lacks a required tensor (enorm, hnorm, eh_proj, shared_head.norm,
  attention, MLP) is an error: engines fail as soon as MTP is enabled. A missing embed_tokens /
  shared_head.head copy is a warning (SGLang skips them, vLLM loads embed_tokens from the MTP layer).
- mtp-eh-proj: eh_proj stored quantized; vLLM builds it as a plain nn.Linear and TRT-LLM excludes it. Error.
- mtp-declared: an MTP projection stored in a format the config does not declare for it: quantized
  while listed in exclude_modules/ignore, or BF16 while the config quantizes it (shape errors such as
  "512 vs 1024", vLLM PR #53790). Error.
"""

from __future__ import annotations

from dsquant.check.declared import declared_quantized
from dsquant.check.finding import Finding
from dsquant.check.names import SCALE_PARAMS, is_decoder_linear, is_quantized, module_format, num_layers
from dsquant.checkpoint.reader import Checkpoint

REQUIRED = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
MAX_LISTED = 3


def check(view: Checkpoint) -> list[Finding]:
    n_layers, n_mtp = num_layers(view.config), (view.config or {}).get("num_nextn_predict_layers") or 0
    if n_layers is None or not isinstance(n_mtp, int) or n_mtp <= 0:
        return []
    findings = []
    for layer in range(n_layers, n_layers + n_mtp):
        findings += _check_layer(view, f"model.layers.{layer}")
    return findings


def _check_layer(view: Checkpoint, prefix: str) -> list[Finding]:
    names = [n for n in view.infos if n.startswith(prefix + ".")]
    if not names:
        return [Finding("mtp-missing", "warning", f"config.json declares num_nextn_predict_layers but no {prefix}.* "
                        "tensor is stored: the model serves, but MTP speculative decoding cannot be enabled "
                        "(transformers-based tools drop this layer; copy it through from the source)", tensor=prefix)]
    out = []
    missing = [s for s in REQUIRED if f"{prefix}.{s}" not in view.infos]
    if not any(n.startswith(f"{prefix}.self_attn.") for n in names):
        missing.append("self_attn.*")
    if not any(n.startswith(f"{prefix}.mlp.") for n in names):
        missing.append("mlp.*")
    if missing:
        out.append(Finding("mtp-missing", "error", f"MTP layer lacks {', '.join(missing)}",
                           tensor=f"{prefix}.{missing[0]}"))
    copies = [s for s in SHARED_COPIES if f"{prefix}.{s}" not in view.infos]
    if copies:
        out.append(Finding("mtp-missing", "warning", f"MTP layer lacks its copies of {', '.join(copies)} "
                           "(vLLM loads embed_tokens from the MTP layer)", tensor=f"{prefix}.{copies[0]}"))
    eh = view.modules.get(f"{prefix}.eh_proj", {})
    if eh and (is_quantized(module_format(eh)) or any(p in SCALE_PARAMS for p in eh)):
        out.append(Finding("mtp-eh-proj", "error", f"{prefix}.eh_proj is stored {module_format(eh)}; vLLM builds it "
                           "as a plain nn.Linear and TensorRT-LLM excludes it: keep it BF16",
                           tensor=f"{prefix}.eh_proj.weight"))
    wrong = []
    for module, params in view.modules.items():
        if not module.startswith(prefix + ".") or not is_decoder_linear(module):
            continue
        fmt = module_format(params)
        declared = declared_quantized(view, module)
        if declared is None:
            if is_quantized(fmt):
                wrong.append(f"{module} is {fmt} but nothing declares quantization")
        elif declared != is_quantized(fmt):
            said = "quantized" if declared else "excluded"
            wrong.append(f"{module} is stored {fmt} but the config declares it {said}")
    if wrong:
        more = f" (and {len(wrong) - MAX_LISTED} more)" if len(wrong) > MAX_LISTED else ""
        out.append(Finding("mtp-declared", "error", f"{len(wrong)} MTP projection(s) disagree with the config "
                           f"(quantize the MTP layer consistently, or store it BF16 and exclude "
                           f"'{prefix}*' / 're:^{prefix.replace('.', chr(92) + '.')}\\..*'): "
                           f"{'; '.join(wrong[:MAX_LISTED])}{more}", tensor=wrong[0].split()[0]))
    return out
