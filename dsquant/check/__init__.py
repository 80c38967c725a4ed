"""`dsquant inspect --check`: lint a quantized checkpoint against the loading rules of vLLM, SGLang and
TensorRT-LLM (formats.md section 8). Works on checkpoints made by any tool: only config files and
safetensors headers are read, plus the few small scale tensors a rule needs.

    findings = check_checkpoint("/models/DeepSeek-R1-NVFP4")
    errors = [f for f in findings if f.severity == "error"]

Each rule family is one module with `check(view) -> list[Finding]`; RULE_FAMILIES lists them in the
order their findings are reported.
"""

from __future__ import annotations

from pathlib import Path

from dsquant.check import (
    config,
    exclusions,
    fused,
    mla,
    mtp,
    router,
    scales,
    structure,
    v4_config,
    v4_dtypes,
    v4_layout,
)
from dsquant.check.finding import Finding, Severity
from dsquant.checkpoint.index import CheckpointError
from dsquant.checkpoint.names_v4 import is_v4
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.survey import survey

__all__ = ["Finding", "Severity", "CheckpointError", "check_checkpoint", "check_view", "RULE_FAMILIES",
           "V4_RULE_FAMILIES"]

RULE_FAMILIES = (structure, config, exclusions, fused, scales, mla, router, mtp)
# DeepSeek-V4 (official unprefixed names, `.scale` tensors) has its own layout rules; index and shards are common.
V4_RULE_FAMILIES = (structure, v4_config, v4_layout, v4_dtypes)


def check_view(view: Checkpoint) -> list[Finding]:
    """Run every rule family on an opened checkpoint; errors first, then warnings, each in family order."""
    findings: list[Finding] = []
    for family in V4_RULE_FAMILIES if is_v4(view.config) else RULE_FAMILIES:
        findings += family.check(view)
    if not view.can_read_values:
        findings.append(Finding("values-not-read", "warning", f"{view.remote}: checked from headers only; the rules "
                                "that read scale values (fused global scales, global-scale values, UE8M0 scales) "
                                "did not run. Download the checkpoint and check it locally for those"))
    return sorted(findings, key=lambda f: f.severity != "error")


def check_checkpoint(path: str | Path) -> list[Finding]:
    """Lint the checkpoint directory `path`.

    Raises CheckpointError (a ValueError naming the file) only when `path` cannot be read as a checkpoint
    at all: not a directory, no safetensors, an index or config that is not JSON. Everything else,
    including missing or corrupt shards, is reported as a Finding.
    """
    return check_view(survey(Path(path)))
