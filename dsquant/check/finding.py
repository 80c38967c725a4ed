"""The result type of every --check rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in a checkpoint.

    `error`: at least one of vLLM, SGLang or TensorRT-LLM refuses the checkpoint or computes wrong
    results with it. `warning`: it loads, but something is likely not what the author meant.
    """

    rule: str
    severity: Severity
    message: str
    tensor: str | None = None
    file: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = self.tensor or self.file
        return f"{self.severity.upper()} [{self.rule}] {where + ': ' if where else ''}{self.message}"
