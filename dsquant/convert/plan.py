"""Plan a conversion from headers alone: every tensor's rule, fused partners, output shards, sizes.

Nothing here reads tensor data. `build_plan` resolves each module with the recipe (no match is an
error listing the modules), groups fused partners (gate/up, q_a/kv_a) even across source shards,
validates shapes against the target formats (what `--dry-run` calls validation on the meta device:
the output specs are derived from shapes and dtypes only) and packs the work into output shards of at
most `max_shard_size` bytes. The plan is deterministic, and its fingerprint guards `--resume`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from dsquant.checkpoint.names import (
    FP8_SCALE_SUFFIX,
    check_architecture,
    fused_group_key,
    generalize,
    leaf_of,
    module_of,
    mtp_layers,
)
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.ondisk import stored_specs
from dsquant.formats.registry import get
from dsquant.recipe import Ignore, Recipe


@dataclass
class ModuleJob:
    """One module's work. action: "copy" (bytes as stored), "dequant" (FP8 source -> BF16), "quant"."""

    module: str
    action: str
    fmt: str  # "keep" for ignored modules, else the rule's format
    rule: object  # Ignore | Rule
    sources: list[str]  # source tensor names read (weights and their FP8 scales)
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    fp8_source: bool = False

    @property
    def bytes_out(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, d, s in self.outputs)


@dataclass
class ShardJob:
    """One output shard: a list of items, each a fused group (or a single module) processed together."""

    file: str
    items: list[list[ModuleJob]]

    @property
    def entries(self):
        return [o for item in self.items for job in item for o in job.outputs]

    @property
    def bytes_out(self) -> int:
        return sum(job.bytes_out for item in self.items for job in item)


@dataclass
class Plan:
    recipe: Recipe
    convention: str
    source_dtype: str  # "bf16" | "fp8"
    shards: list[ShardJob]
    bytes_in: int
    fingerprint: str = ""
    excluded_modules: list[str] = field(default_factory=list)
    family: str = "v3"  # "v4": DeepSeek-V4 official layout, planned and processed by v4
    results: dict = field(default_factory=dict)  # what processing measured (v4: exact expert blocks)

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.shards)

    def jobs(self):
        return [job for s in self.shards for item in s.items for job in item]

    def table(self, ckpt: Checkpoint) -> list[dict]:
        """Rows for --dry-run: one per (generalized module pattern, rule, format) with counts and bytes."""
        rows: dict[tuple, dict] = {}
        for job in self.jobs():
            key = (generalize(job.module), job.rule.match, job.fmt)
            row = rows.setdefault(key, {"pattern": key[0], "rule": key[1], "format": key[2], "count": 0,
                                        "bytes_in": 0, "bytes_out": 0})
            row["count"] += 1
            row["bytes_in"] += sum(ckpt.infos[s].nbytes for s in job.sources)
            row["bytes_out"] += job.bytes_out
        return list(rows.values())


def _module_tensors(ckpt: Checkpoint) -> dict[str, list[str]]:
    """module -> its tensor names (scales attached to their weight's module), in source reading order."""
    order = sorted(ckpt.infos.values(), key=lambda i: (i.file, i.start))
    modules: dict[str, list[str]] = {}
    for info in order:
        modules.setdefault(module_of(info.name), []).append(info.name)
    return modules


def _check_fp8_scales(ckpt: Checkpoint) -> None:
    for name, info in ckpt.infos.items():
        if info.dtype.itemsize == 1 and not name.endswith(FP8_SCALE_SUFFIX):
            if name + FP8_SCALE_SUFFIX not in ckpt.infos:
                raise ValueError(f"{ckpt.path / info.file}: FP8 weight {name!r} has no {name + FP8_SCALE_SUFFIX} "
                                 f"in the checkpoint (DeepSeek FP8 weights need their block scales)")
        if name.endswith(FP8_SCALE_SUFFIX) and name[: -len(FP8_SCALE_SUFFIX)] not in ckpt.infos:
            raise ValueError(f"{ckpt.path / info.file}: scale {name!r} has no weight")


def _job(ckpt: Checkpoint, module: str, names: list[str], entry, convention: str) -> ModuleJob:
    weights = [n for n in names if not n.endswith(FP8_SCALE_SUFFIX)]
    fp8 = any(ckpt.infos[n].dtype.itemsize == 1 for n in weights)
    if isinstance(entry, Ignore) or not get(entry.format).quantized:
        outputs = []
        for n in weights:
            info = ckpt.infos[n]
            outputs.append((n, torch.bfloat16 if info.dtype.itemsize == 1 else info.dtype, info.shape))
        fmt = "keep" if isinstance(entry, Ignore) else "bf16"
        return ModuleJob(module, "dequant" if fp8 else "copy", fmt, entry, names, outputs, fp8)
    weight = module + ".weight"
    info = ckpt.infos.get(weight)
    if weights != [weight] or info is None or len(info.shape) != 2:
        raise ValueError(f"{ckpt.path / ckpt.infos[names[0]].file}: rule {entry.match!r} would quantize module "
                         f"{module!r}, but only a 2-D Linear weight can be quantized (it has "
                         f"{[(n, list(ckpt.infos[n].shape)) for n in weights]}); add it to the recipe's ignore list")
    k, fmt = info.shape[1], get(entry.format)
    min_k = fmt.block[1] if fmt.packed else 1  # packed FP4 scales whole groups along K
    if k % min_k:
        raise ValueError(f"{ckpt.path / info.file}: tensor {weight!r} has {k} input columns, not a multiple of "
                         f"{min_k}, so {entry.format} cannot hold it; give it another rule")
    outputs = stored_specs(convention, entry.format, module, info.shape, info.dtype)
    return ModuleJob(module, "quant", entry.format, entry, names, outputs, fp8)


def _items(jobs: dict[str, ModuleJob], recipe: Recipe) -> list[list[ModuleJob]]:
    """Fused partners become one item (processed together: one scheme, one global scale)."""
    groups: dict[tuple, list[ModuleJob]] = defaultdict(list)
    items, seen = [], set()
    for module, job in jobs.items():
        key = fused_group_key(module, recipe.fused_groups) if recipe.fused_groups else None
        if key is not None:
            groups[key].append(job)
    for members in groups.values():
        schemes = {("ignore",) if isinstance(j.rule, Ignore) else j.rule.scheme() for j in members}
        if len(schemes) > 1:
            desc = ", ".join(f"{j.module} -> {j.fmt} (rule {j.rule.match!r})" for j in members)
            raise ValueError(f"recipe {recipe.name}: fused partners must share one scheme (vLLM, SGLang and "
                             f"TRT-LLM fuse them into one matrix), but {desc}")
    for module, job in jobs.items():
        if module in seen:
            continue
        key = fused_group_key(module, recipe.fused_groups) if recipe.fused_groups else None
        item = groups[key] if key is not None else [job]
        seen.update(j.module for j in item)
        items.append(item)
    return items


def _pack(items: list[list[ModuleJob]], max_shard_size: int) -> list[ShardJob]:
    shards, current, size = [], [], 0
    for item in items:
        n = sum(j.bytes_out for j in item)
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        shards.append(current)
    total = len(shards)
    return [ShardJob(f"model-{i + 1:05d}-of-{total:05d}.safetensors", s) for i, s in enumerate(shards)]


def build_plan(ckpt: Checkpoint, recipe: Recipe, convention: str, max_shard_size: int) -> Plan:
    """Resolve, validate and lay out the whole conversion; raises ValueError naming what is wrong."""
    check_architecture(ckpt.config, str(ckpt.path / "config.json"))
    _check_fp8_scales(ckpt)
    compiled = recipe.compiled(mtp_layers(ckpt.config))
    modules = _module_tensors(ckpt)
    resolved, unmatched = {}, []
    for module in modules:
        entry = compiled.resolve(module)
        if entry is None:
            unmatched.append(module)
        resolved[module] = entry
    if unmatched:
        shown = ", ".join(sorted({generalize(m) for m in unmatched})[:10])
        raise ValueError(f"recipe {recipe.name}: {len(unmatched)} module(s) match no ignore entry or rule: {shown}; "
                         f"add a [[rules]] or [[ignore]] entry for them")
    jobs = {m: _job(ckpt, m, names, resolved[m], convention) for m, names in modules.items()}
    fp8 = any(j.fp8_source for j in jobs.values())
    excluded = [j.module for j in jobs.values()
                if j.action != "quant" and any(len(s) == 2 for _, _, s in j.outputs)
                and leaf_of(j.module) != "embed_tokens"]
    return lay_out_plan(ckpt, jobs, recipe, convention, max_shard_size, "fp8" if fp8 else "bf16", excluded)


def lay_out_plan(ckpt: Checkpoint, jobs: dict[str, ModuleJob], recipe: Recipe, convention: str, max_shard_size: int,
                 source_dtype: str, excluded: list[str], family: str = "v3") -> Plan:
    """Resolved module jobs -> the plan: fused partners grouped, output shards packed, fingerprint taken."""
    shards = _pack(_items(jobs, recipe), max_shard_size)
    plan = Plan(recipe, convention, source_dtype, shards, sum(i.nbytes for i in ckpt.infos.values()),
                excluded_modules=excluded, family=family)
    plan.fingerprint = _fingerprint(ckpt, plan)
    return plan


def _fingerprint(ckpt: Checkpoint, plan: Plan) -> str:
    h = hashlib.sha256()
    src = {n: [i.file, str(i.dtype), list(i.shape), i.start, i.end] for n, i in sorted(ckpt.infos.items())}
    h.update(json.dumps({"recipe": plan.recipe.to_dict(), "convention": plan.convention, "source": src,
                         "sizes": {f: (ckpt.path / f).stat().st_size for f in ckpt.files}}, sort_keys=True).encode())
    for shard in plan.shards:
        h.update(json.dumps([shard.file, [[n, str(d), list(s)] for n, d, s in shard.entries]]).encode())
    return h.hexdigest()
