"""The result type of every --check rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning"]
MAX_LISTED = 3  # details quoted in one finding's message


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


class Collector:
    """Findings gathered per (rule, severity) and reported as one line each: a lead, the first details, a count."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], list[str]] = {}
        self.first: dict[tuple[str, str], str] = {}

    def add(self, rule: str, severity: str, tensor: str, detail: str) -> None:
        self.items.setdefault((rule, severity), []).append(detail)
        self.first.setdefault((rule, severity), tensor)

    def findings(self, lead: dict[str, str]) -> list[Finding]:
        out = []
        for (rule, severity), details in self.items.items():
            more = f" (and {len(details) - MAX_LISTED} more)" if len(details) > MAX_LISTED else ""
            out.append(Finding(rule, severity, f"{lead[rule]}: {'; '.join(details[:MAX_LISTED])}{more}",
                               tensor=self.first[(rule, severity)]))
        return out
