"""Recipes: a TOML file that says, for every tensor of a checkpoint, how it is stored.

A recipe file (recipes/*.toml; its first comment line is the summary `dsquant recipes` prints):

    version = 1                                   # recipe grammar version (only 1 exists)
    conventions = ["modelopt", "compressed-tensors"]  # on-disk conventions allowed; the first is `--format auto`
    fused_groups = [["gate_proj", "up_proj"], ["q_a_proj", "kv_a_proj_with_mqa"]]

    [[ignore]]                                    # kept exactly as in the source (no quantization)
    match = "*norm*"
    reason = "norms are vectors; engines keep them in BF16"

    [[rules]]                                     # ordered; the first rule whose `match` fits wins
    match = "*.mlp.experts.*"
    format = "nvfp4"                              # bf16 | fp8-block | int8 | nvfp4 | mxfp4
    reason = "..."
    # format options: ue8m0 (fp8-block), scale_rule (mxfp4), input_scale (nvfp4)

Patterns match *module* names (a tensor name without its last component: `model.layers.3.mlp.gate`
for `model.layers.3.mlp.gate.weight`). A pattern is a glob (`*` spans dots, `?` one character) or a
regex after `re:`; both must match the whole name. `{mtp}` stands for the index of the model's MTP
layer(s) (61 on DeepSeek-V3), so a recipe can treat that layer apart without knowing the model; `{dspark}`
stands for the stage indices of a DeepSeek-V4 DSpark draft (`mtp.S`, 0731 / 0813 releases), matching nothing on
models without one (V4's one-stage MTP draft has the same `mtp.0` names, so names alone cannot tell them apart).
Ignore is checked before the rules. A tensor that neither matches is an error; so are unknown keys.
Members of a fused group (leaf names under one parent module) must resolve to the same rule.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dsquant.formats.mxfp4 import MXFP4_SCALE_RULES
from dsquant.formats.ondisk import CONVENTIONS, DEFAULT_NVFP4_INPUT_SCALE, FORMAT_CONVENTIONS, FORMATS
from dsquant.recipe_files import resolve_recipe_path

RECIPE_VERSIONS = (1,)
_TOP_KEYS = {"version", "name", "conventions", "fused_groups", "ignore", "rules"}
_IGNORE_KEYS = {"match", "reason"}
_RULE_KEYS = {"match", "format", "reason", "ue8m0", "scale_rule", "input_scale"}
_FORMAT_OPTIONS = {"fp8-block": {"ue8m0"}, "mxfp4": {"scale_rule"}, "nvfp4": {"input_scale"}}


def _alternatives(indices: tuple[int, ...]) -> str:
    return "(?:" + "|".join(str(i) for i in indices) + ")" if indices else "(?!)"


def compile_pattern(pattern: str, mtp_layers: tuple[int, ...] = (), dspark_stages: tuple[int, ...] = ()) -> re.Pattern:
    """Glob or `re:` regex -> compiled regex matching whole module names; `{mtp}` -> the MTP layer indices,
    `{dspark}` -> the DSpark draft stage indices."""
    subs = {"{mtp}": _alternatives(mtp_layers), "{dspark}": _alternatives(dspark_stages)}
    if pattern.startswith("re:"):
        text = pattern[3:]
        for key, value in subs.items():
            text = text.replace(key, value)
        return re.compile(text)
    out = []
    for part in re.split(r"(\{mtp\}|\{dspark\}|\*|\?)", pattern):
        out.append({**subs, "*": ".*", "?": "."}.get(part, re.escape(part)))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class Ignore:
    """Modules kept exactly as the source stores them (FP8 sources: dequantized to BF16)."""

    match: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rule:
    """Modules matching `match` are stored in `format` with these options."""

    match: str
    format: str
    reason: str
    ue8m0: bool = False
    scale_rule: str = "ocp"
    input_scale: float = DEFAULT_NVFP4_INPUT_SCALE

    def scheme(self) -> tuple:
        """What must agree between fused partners: format and its options."""
        return (self.format, self.ue8m0, self.scale_rule, self.input_scale)


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    version: int
    summary: str
    conventions: tuple[str, ...]
    fused_groups: tuple[tuple[str, ...], ...]
    ignore: tuple[Ignore, ...]
    rules: tuple[Rule, ...]
    path: str = field(default="", compare=False)

    def compiled(self, mtp_layers: tuple[int, ...] = (), dspark_stages: tuple[int, ...] = ()) -> "CompiledRecipe":
        return CompiledRecipe(self, mtp_layers, dspark_stages)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["conventions"] = list(self.conventions)
        d["fused_groups"] = [list(g) for g in self.fused_groups]
        return d

    def formats(self) -> set[str]:
        return {r.format for r in self.rules}


class CompiledRecipe:
    """A recipe with its patterns compiled for one model (its MTP layer indices, DSpark stages)."""

    def __init__(self, recipe: Recipe, mtp_layers: tuple[int, ...], dspark_stages: tuple[int, ...] = ()):
        self.recipe = recipe
        self._ignore = [(compile_pattern(i.match, mtp_layers, dspark_stages), i) for i in recipe.ignore]
        self._rules = [(compile_pattern(r.match, mtp_layers, dspark_stages), r) for r in recipe.rules]

    def resolve(self, module: str) -> Ignore | Rule | None:
        """First ignore entry, else first rule, whose pattern matches the whole module name; None if none."""
        for pattern, entry in self._ignore:
            if pattern.fullmatch(module):
                return entry
        for pattern, rule in self._rules:
            if pattern.fullmatch(module):
                return rule
        return None


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _typed(value, types, key: str, where: str):
    """Return value if it has one of `types` (a bool never passes for a number), else ValueError."""
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise ValueError(f"{where}: {key} = {value!r} has the wrong type; expected {types}")
    return value


def _parse_rule(table: dict, where: str) -> Rule:
    _check_keys(table, _RULE_KEYS, where)
    for key in ("match", "format", "reason"):
        if key not in table:
            raise ValueError(f"{where}: missing key {key!r}")
        _typed(table[key], str, key, where)
    fmt = table["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is unknown; known formats: {list(FORMATS)}")
    options = set(table) - {"match", "format", "reason"}
    wrong = sorted(options - _FORMAT_OPTIONS.get(fmt, set()))
    if wrong:
        raise ValueError(f"{where}: option(s) {wrong} do not apply to format {fmt!r}; "
                         f"its options: {sorted(_FORMAT_OPTIONS.get(fmt, set())) or 'none'}")
    rule = Rule(table["match"], fmt, table["reason"], ue8m0=_typed(table.get("ue8m0", False), bool, "ue8m0", where),
                scale_rule=_typed(table.get("scale_rule", "ocp"), str, "scale_rule", where),
                input_scale=float(_typed(table.get("input_scale", DEFAULT_NVFP4_INPUT_SCALE), (int, float),
                                         "input_scale", where)))
    if rule.scale_rule not in MXFP4_SCALE_RULES:
        raise ValueError(f"{where}: scale_rule {rule.scale_rule!r} is unknown; choose one of {MXFP4_SCALE_RULES}")
    if not (rule.input_scale > 0 and rule.input_scale < float("inf")):
        raise ValueError(f"{where}: input_scale must be a positive finite number, got {rule.input_scale}")
    compile_pattern(rule.match)
    return rule


def parse_recipe(text: str, name: str, where: str = "recipe") -> Recipe:
    """TOML text -> Recipe, or ValueError naming `where` and what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML: {e}") from None
    _check_keys(data, _TOP_KEYS, where)
    version = data.get("version")
    if version not in RECIPE_VERSIONS:
        raise ValueError(f"{where}: version = {version!r}; this dsquant reads recipe versions {RECIPE_VERSIONS}")
    conventions = tuple(_typed(data.get("conventions", []), list, "conventions", where))
    if not conventions or any(c not in CONVENTIONS for c in conventions):
        raise ValueError(f"{where}: conventions = {list(conventions)}; give one or more of {list(CONVENTIONS)}")
    ignore = []
    for i, table in enumerate(_typed(data.get("ignore", []), list, "ignore", where)):
        _check_keys(table, _IGNORE_KEYS, f"{where} [[ignore]] #{i + 1}")
        if not isinstance(table.get("match"), str) or not isinstance(table.get("reason"), str):
            raise ValueError(f"{where} [[ignore]] #{i + 1}: needs string keys 'match' and 'reason'")
        compile_pattern(table["match"])
        ignore.append(Ignore(table["match"], table["reason"]))
    rules = tuple(_parse_rule(t, f"{where} [[rules]] #{i + 1}") for i, t in enumerate(data.get("rules", [])))
    if not rules:
        raise ValueError(f"{where}: no [[rules]]; a recipe needs at least one")
    for rule in rules:
        bad = [c for c in conventions if c not in FORMAT_CONVENTIONS[rule.format]]
        if bad:
            raise ValueError(f"{where}: format {rule.format!r} (rule {rule.match!r}) cannot be stored in {bad}; "
                             f"it fits {list(FORMAT_CONVENTIONS[rule.format])}")
    groups = _typed(data.get("fused_groups", []), list, "fused_groups", where)
    if any(not isinstance(g, list) or not all(isinstance(m, str) for m in g) for g in groups):
        raise ValueError(f"{where}: fused_groups must be a list of lists of leaf module names")
    summary = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
    return Recipe(str(data.get("name", name)), version, summary, conventions, tuple(tuple(g) for g in groups),
                  tuple(ignore), rules)


def load_recipe(name_or_path: str) -> Recipe:
    """`nvfp4` (a shipped recipe) or a path to a .toml file -> Recipe."""
    path = resolve_recipe_path(name_or_path)
    return replace(parse_recipe(path.read_text(), Path(path).stem, where=str(path)), path=str(path))
