"""Rules on exclude/ignore lists against what the file stores (formats.md section 8, items 8 and 9).

- exclude-overmatch: an entry also matches modules its author did not mean (`mlp.gate` hits
  `mlp.gate_proj` under ModelOpt substring matching). Error when such a module is stored quantized:
  the engine builds it unquantized and then has no parameter for its scales.
- exclude-invalid: a compressed-tensors `re:` entry that is not a valid regular expression (vLLM raises
  re.error while loading). Error.
- exclude-unmatched: an entry matches no module in the file (often an engine-internal fused name such
  as `gate_up_proj`, or a CT exact entry naming a parent module). Warning.
- excluded-but-quantized: a module the config excludes carries quantized weights or scale tensors
  ("no module or parameter named 'lm_head.input_scale'", vLLM PR #45132). Error.
- quantized-not-declared / unquantized-not-excluded: the stored format of a decoder linear disagrees
  with what the config declares for it. Error.
MTP-layer modules are left to mtp.py, which words the same problems for that layer.
"""

from __future__ import annotations

from dsquant.check.declared import compile_or_none, declared_quantized, exclusions
from dsquant.check.finding import Finding
from dsquant.check.names import SCALE_PARAMS, is_decoder_linear, is_mtp, is_quantized, module_format
from dsquant.checkpoint.reader import Checkpoint

MAX_EXAMPLES = 3


def _examples(names: list[str]) -> str:
    more = f" and {len(names) - MAX_EXAMPLES} more" if len(names) > MAX_EXAMPLES else ""
    return ", ".join(names[:MAX_EXAMPLES]) + more


def weight_modules(view: Checkpoint) -> dict[str, str]:
    """module -> stored format, for every module that has a weight."""
    out = {}
    for module, params in view.modules.items():
        fmt = module_format(params)
        if fmt is not None:
            out[module] = fmt
    return out


def check(view: Checkpoint) -> list[Finding]:
    findings: list[Finding] = []
    modules = weight_modules(view)
    excl = exclusions(view)
    overmatched: set[str] = set()
    for lst, entry_hits in zip(excl.lists, excl.hits):
        for entry, hits in entry_hits.items():
            if lst.semantics == "compressed-tensors" and entry.startswith("re:") and compile_or_none(entry[3:]) is None:
                findings.append(Finding("exclude-invalid", "error", f"{lst.source} entry {entry!r} is not a valid "
                                        "regular expression", file=lst.source.split()[0]))
                continue
            if not hits:
                findings.append(Finding(
                    "exclude-unmatched", "warning",
                    f"{lst.source} entry {entry!r} matches no module in the checkpoint; use HF checkpoint "
                    "names (model.layers.N....), not engine-internal fused names",
                    file=lst.source.split()[0]))
                continue
            over = [m for m in hits if not lst.clean(entry, m)]
            if not over:
                continue
            overmatched.update(over)
            quantized = [m for m in over if is_quantized(modules[m])]
            hint = "write full names or, in compressed-tensors, an anchored 're:...$' regex"
            if quantized:
                findings.append(Finding(
                    "exclude-overmatch", "error",
                    f"{lst.source} entry {entry!r} also matches {len(over)} module(s) it was probably not meant for "
                    f"({lst.semantics} matching), {len(quantized)} of them stored quantized: {_examples(quantized)}. "
                    f"Engines build those unquantized and cannot load their scales; {hint}",
                    tensor=quantized[0], file=lst.source.split()[0]))
            else:
                findings.append(Finding(
                    "exclude-overmatch", "warning",
                    f"{lst.source} entry {entry!r} also matches {_examples(over)} ({lst.semantics} matching); "
                    f"they are stored unquantized so it loads, but {hint}",
                    tensor=over[0], file=lst.source.split()[0]))
    findings += _stored_vs_declared(view, modules, excl.excluded, overmatched)
    return findings


def _stored_vs_declared(view, modules, excluded_set, overmatched) -> list[Finding]:
    findings = []
    bad: dict[str, list[str]] = {"excluded-but-quantized": [], "quantized-not-declared": [],
                                 "unquantized-not-excluded": []}
    for module, fmt in modules.items():
        if is_mtp(module, view.config) or module in overmatched:
            continue
        excluded = module in excluded_set
        scales = [p for p in view.modules[module] if p in SCALE_PARAMS]
        if excluded and (is_quantized(fmt) or scales):
            bad["excluded-but-quantized"].append(module)
            continue
        if not is_decoder_linear(module):
            continue
        declared = declared_quantized(view, module)
        if declared is None:
            if is_quantized(fmt):
                bad["quantized-not-declared"].append(module)
        elif declared and not is_quantized(fmt):
            bad["unquantized-not-excluded"].append(module)
        elif not declared and is_quantized(fmt):
            bad["quantized-not-declared"].append(module)
    words = {
        "excluded-but-quantized": "excluded by the config but stored quantized or with scale tensors; the engine "
        "builds an unquantized layer and refuses the extra tensors ('no module or parameter named ...')",
        "quantized-not-declared": "stored quantized, but the config does not declare it quantized; the engine "
        "builds an unquantized layer for it",
        "unquantized-not-excluded": "stored unquantized, but the config neither excludes it nor leaves it out of "
        "its targets; the engine builds a quantized layer and finds no scales for it",
    }
    for rule, names in bad.items():
        if names:
            findings.append(Finding(rule, "error", f"{len(names)} module(s) {words[rule]}: {_examples(names)}",
                                    tensor=names[0]))
    return findings
