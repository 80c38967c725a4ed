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

import bisect
import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

from dsquant.checkpoint.reader import Checkpoint

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
_WILDCARD = re.compile(r"[*?\[]")


@lru_cache(maxsize=4096)
def compile_or_none(pattern: str) -> re.Pattern | None:
    """The compiled pattern, or None when it is not a valid regular expression."""
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
                rx = compile_or_none(entry[3:])
                return bool(rx and rx.match(name))
            return entry == name
        if self.semantics == "modelopt":
            if _WILDCARD.search(entry):
                core = entry.rstrip("*")
                return fnmatch.fnmatchcase(name, entry) or (bool(core) and not _WILDCARD.search(core) and core in name)
            return entry in name
        rx = compile_or_none(rf"(?:{entry}){_BOUNDARY}")
        return entry == name or bool(rx and rx.match(name)) or name.endswith(entry)

    def clean(self, entry: str, name: str) -> bool:
        """True when `entry` covers whole dotted components of `name` (see module docstring)."""
        if self.semantics == "compressed-tensors" and entry.startswith("re:"):
            rx = compile_or_none(entry[3:])
            return bool(rx) and any(rx.fullmatch(p) for p in _dotted_prefixes(name))
        if self.semantics == "compressed-tensors":
            return entry == name
        if self.semantics == "transformers":
            if name == entry or name.startswith(entry + ".") or name.endswith("." + entry):
                return True
            rx = compile_or_none(entry)
            return bool(rx) and any(rx.fullmatch(p) for p in _dotted_prefixes(name))
        core = entry.strip("*")
        body = _glob_regex(core) if self.semantics == "modelopt" else core
        rx = compile_or_none(rf"(?:^|\.){body}(?:\.|$)")
        return bool(rx and rx.search(name))

    def excludes(self, name: str) -> bool:
        return any(self.matches(e, name) for e in self.entries)

    def hits(self, entry: str, index: ModuleIndex) -> list[str]:
        """Modules of `index` that `entry` matches: `matches()` over all of them, computed without
        trying every pair (a 671B checkpoint has ~47k modules, and exclude lists of ~1k full names)."""
        if self.semantics == "compressed-tensors":
            if entry.startswith("re:"):
                rx = compile_or_none(entry[3:])
                return [m for m in index.modules if rx.match(m)] if rx else []
            return [entry] if entry in index.names else []
        if self.semantics == "modelopt":
            if not _WILDCARD.search(entry):
                return index.containing(entry)
            found = set(fnmatch.filter(index.modules, entry))
            core = entry.rstrip("*")
            if core and not _WILDCARD.search(core):
                found.update(index.containing(core))
            return sorted(found)
        if _PLAIN.fullmatch(entry):  # transformers: start-anchored up to a boundary, or a plain suffix
            return sorted(set(index.by_prefix.get(entry, ())) | set(index.ending_with(entry)))
        return [m for m in index.modules if self.matches(entry, m)]


_PLAIN = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")


class ModuleIndex:
    """Module names prepared for fast substring / suffix / dotted-prefix lookups."""

    def __init__(self, modules) -> None:
        self.modules = sorted(modules)
        self.names = set(self.modules)
        self.text = "\n".join(self.modules) + "\n"
        self.starts = []
        pos = 0
        for m in self.modules:
            self.starts.append(pos)
            pos += len(m) + 1
        self.by_prefix: dict[str, list[str]] = {}
        for m in self.modules:
            for p in _dotted_prefixes(m):
                self.by_prefix.setdefault(p, []).append(m)

    def containing(self, sub: str) -> list[str]:
        out, i = [], self.text.find(sub)
        while i >= 0:
            k = bisect.bisect_right(self.starts, i) - 1
            out.append(self.modules[k])
            i = self.text.find(sub, self.starts[k + 1] if k + 1 < len(self.starts) else len(self.text))
        return out

    def ending_with(self, suffix: str) -> list[str]:
        return [m for m in self.containing(suffix + "\n") if m.endswith(suffix)]


def exclude_lists(view: Checkpoint) -> list[ExcludeList]:
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


@dataclass
class Exclusions:
    """Every exclude list of a checkpoint, with each entry's hits among its weight modules."""

    lists: list[ExcludeList]
    hits: list[dict[str, list[str]]]  # per list: entry -> modules it matches
    excluded: set[str]  # modules any entry matches


def exclusions(view: Checkpoint) -> Exclusions:
    """Computed once per view (the rule families share it)."""
    cached = view.cache.get("exclusions")
    if cached is None:
        from dsquant.check.names import module_format

        index = ModuleIndex(m for m, params in view.modules.items() if module_format(params) is not None)
        lists = exclude_lists(view)
        hits = [{e: lst.hits(e, index) for e in lst.entries} for lst in lists]
        cached = Exclusions(lists, hits, {m for per in hits for ms in per.values() for m in ms})
        view.cache["exclusions"] = cached
    return cached


def declared_quantized(view: Checkpoint, module: str) -> bool | None:
    """Whether the configs say the weight module `module` is quantized; None when nothing is declared."""
    qc = view.quantization_config
    hq = (view.hf_quant_config or {}).get("quantization")
    if qc is None and not isinstance(hq, dict):
        return None
    if module in exclusions(view).excluded:
        return False
    if qc is not None and qc.get("quant_method") == "compressed-tensors":
        return _ct_targeted(qc, module)
    layers = (hq or {}).get("quantized_layers") or (qc or {}).get("quantized_layers")
    if isinstance(layers, dict) and layers:  # ModelOpt MIXED_PRECISION lists every quantized layer
        return module in layers
    return True


def ct_scheme(qc: dict, module: str) -> dict | None:
    """The compressed-tensors config group that quantizes `module` as compressed-tensors itself decides it
    (`match_named_modules`): None when an `ignore` entry (exact name or `re:`) matches it, else `ct_group`."""
    ignore = ExcludeList("quantization_config.ignore", "compressed-tensors", tuple(map(str, qc.get("ignore") or ())))
    return None if ignore.excludes(module) else ct_group(qc, module)


def _ct_targeted(qc: dict, module: str) -> bool:
    return ct_group(qc, module) is not None


def ct_group(qc: dict, module: str) -> dict | None:
    """The compressed-tensors config group that applies to `module`: an exact-name target wins over a
    `re:` target, which wins over a class target (`Linear`), as in vLLM's scheme lookup."""
    groups = qc.get("config_groups") or {}
    best, rank = None, 3
    for group in groups.values() if isinstance(groups, dict) else ():
        for target in (group or {}).get("targets", []):
            target = str(target)
            if target == module:
                r = 0
            elif target.startswith("re:") and (rx := compile_or_none(target[3:])) and rx.match(module):
                r = 1
            elif target in ("Linear", "LinearBase"):
                r = 2
            else:
                continue
            if r < rank:
                best, rank = group, r
    return best
