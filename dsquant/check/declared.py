"""What the config files declare: exclude/ignore lists with each engine's matching semantics, and
whether a given module is declared quantized.

Matching semantics differ by convention (formats.md section 8.8):
    modelopt            vLLM `is_layer_excluded` / old SGLang: substring (`entry in name`) plus fnmatch
                        wildcards; vLLM also splits `path*` into `path` and `path.*`.
    compressed-tensors  vLLM/SGLang `should_ignore_layer`: exact name, or `re:` + `re.match` (anchored
                        at the start only, so `re:.*mlp\\.gate` also hits `mlp.gate_proj`). Also SGLang
                        `w8a8_int8`'s `ignore`.
    transformers        FP8 `modules_to_not_convert` / `ignored_layers`: `re.match` up to a module
                        boundary, or a plain `name.endswith(entry)` (transformers `should_convert_module`);
                        vLLM's FP8 loader takes exact names.
A match is *clean* when the entry covers whole dotted components of the name (`mlp.gate` covers
`model.layers.3.mlp.gate`, and `model.layers.61*` covers `model.layers.61.eh_proj`); a match that ends
or starts inside a component (`mlp.gate` in `mlp.gate_proj`) is an over-match.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

from dsquant.check.view import CheckpointView

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
_WILDCARD = re.compile(r"[*?\[]")


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _glob_regex(glob: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)


def _dotted_prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass(frozen=True)
class ExcludeList:
    """One exclude/ignore list as a config file states it."""

    source: str  # where it was read, for messages: "hf_quant_config.json quantization.exclude_modules"
    semantics: str  # "modelopt" | "compressed-tensors" | "transformers"
    entries: tuple[str, ...]

    def matches(self, entry: str, name: str) -> bool:
        if self.semantics == "compressed-tensors":
            if entry.startswith("re:"):
                rx = _regex(entry[3:])
                return bool(rx and rx.match(name))
            return entry == name
        if self.semantics == "modelopt":
            if _WILDCARD.search(entry):
                core = entry.rstrip("*")
                return fnmatch.fnmatchcase(name, entry) or (bool(core) and not _WILDCARD.search(core) and core in name)
            return entry in name
        rx = _regex(rf"(?:{entry}){_BOUNDARY}")
        return entry == name or bool(rx and rx.match(name)) or name.endswith(entry)

    def clean(self, entry: str, name: str) -> bool:
        """True when `entry` covers whole dotted components of `name` (see module docstring)."""
        if self.semantics == "compressed-tensors" and entry.startswith("re:"):
            rx = _regex(entry[3:])
            return bool(rx) and any(rx.fullmatch(p) for p in _dotted_prefixes(name))
        if self.semantics == "compressed-tensors":
            return entry == name
        if self.semantics == "transformers":
            if name == entry or name.startswith(entry + ".") or name.endswith("." + entry):
                return True
            rx = _regex(entry)
            return bool(rx) and any(rx.fullmatch(p) for p in _dotted_prefixes(name))
        core = entry.strip("*")
        body = _glob_regex(core) if self.semantics == "modelopt" else core
        rx = _regex(rf"(?:^|\.){body}(?:\.|$)")
        return bool(rx and rx.search(name))

    def excludes(self, name: str) -> bool:
        return any(self.matches(e, name) for e in self.entries)


def exclude_lists(view: CheckpointView) -> list[ExcludeList]:
    """Every exclude/ignore list the config files declare, with the semantics its readers apply."""
    out = []
    hq = (view.hf_quant_config or {}).get("quantization")
    if isinstance(hq, dict) and isinstance(hq.get("exclude_modules"), list):
        out.append(ExcludeList("hf_quant_config.json quantization.exclude_modules", "modelopt",
                               tuple(map(str, hq["exclude_modules"]))))
    qc = view.quantization_config or {}
    method = str(qc.get("quant_method", ""))
    for key in ("ignore", "exclude_modules", "ignored_layers", "modules_to_not_convert"):
        entries = qc.get(key)
        if not isinstance(entries, list):
            continue
        if method.startswith("modelopt"):
            semantics = "modelopt"
        elif method in ("compressed-tensors", "w8a8_int8"):
            semantics = "compressed-tensors"
        else:
            semantics = "transformers"
        out.append(ExcludeList(f"config.json quantization_config.{key}", semantics, tuple(map(str, entries))))
    return out


def declared_quantized(view: CheckpointView, module: str, lists: list[ExcludeList] | None = None) -> bool | None:
    """Whether the configs say `module` (a linear layer) is quantized; None when nothing is declared."""
    qc = view.quantization_config
    hq = (view.hf_quant_config or {}).get("quantization")
    if qc is None and not isinstance(hq, dict):
        return None
    lists = exclude_lists(view) if lists is None else lists
    if any(lst.excludes(module) for lst in lists):
        return False
    if qc is not None and qc.get("quant_method") == "compressed-tensors":
        return _ct_targeted(qc, module)
    layers = (hq or {}).get("quantized_layers") or (qc or {}).get("quantized_layers")
    if isinstance(layers, dict) and layers:  # ModelOpt MIXED_PRECISION lists every quantized layer
        return module in layers
    return True


def _ct_targeted(qc: dict, module: str) -> bool:
    groups = qc.get("config_groups") or {}
    for group in groups.values() if isinstance(groups, dict) else ():
        for target in (group or {}).get("targets", []):
            target = str(target)
            if target in ("Linear", "LinearBase", module):
                return True
            if target.startswith("re:") and (rx := _regex(target[3:])) and rx.match(module):
                return True
    return False
