"""`dsquant inspect`: what a checkpoint holds, read from config files and safetensors headers only.

summarize_checkpoint(path) works on any DeepSeek-family checkpoint, whoever wrote it: it detects the
convention (DeepSeek FP8, ModelOpt, compressed-tensors, unquantized) from the config files and the
tensor names, reports the storage format of each tensor group, and whether the index, config.json and
the shards agree. format_summary() renders it as the table `dsquant inspect` prints.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dsquant.check import structure
from dsquant.check.config import declared_families, stored_families
from dsquant.check.names import module_format, role
from dsquant.checkpoint import names_v4
from dsquant.checkpoint.names_v4 import is_v4
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.survey import survey
from dsquant.formats.registry import CONVENTIONS, convention_of, convention_of_module
from dsquant.units import human_bytes

DRAFT_NAMES = {"mtp": "MTP", "dspark": "DSpark"}
GROUP_ORDER = ("embeddings", "attention", "compressor", "indexer", "dense MLP", "shared experts", "routed experts",
               "router", "mhc", "norms", "lm_head", "mtp", "other")


def detect_convention(view: Checkpoint) -> str:
    """The label of the convention dsquant.formats.registry.convention_of reads from the config files
    (deepseek-fp8 | deepseek-v4-fp8 | modelopt | compressed-tensors), else any other quant_method as it is,
    unquantized, or undeclared (quantized tensors, no config). config.json wins over hf_quant_config.json."""
    qc = view.quantization_config if view.quantization_config is not None else view.hf_quant_config
    convention = convention_of(qc, strict=False, v4=is_v4(view.config))
    if convention is not None:
        return CONVENTIONS[convention].label
    method = str((qc or {}).get("quant_method", ""))
    if method:
        return method
    return "undeclared" if stored_families(view) else "unquantized"


def _declared(view: Checkpoint) -> dict:
    qc, hq = view.quantization_config, (view.hf_quant_config or {}).get("quantization")
    out = {}
    if qc is not None:
        out["config.json"] = {k: qc.get(k) for k in ("quant_method", "quant_algo", "format", "scale_fmt",
                                                      "weight_block_size") if qc.get(k) is not None}
    if isinstance(hq, dict):
        out["hf_quant_config.json"] = {k: hq.get(k) for k in ("quant_algo", "group_size", "kv_cache_quant_algo")}
    fams = declared_families(view)
    if fams is not None:
        out["families"] = sorted(fams[0])
    return out


def _groups(view: Checkpoint) -> list[dict]:
    acc: dict[str, dict] = {}
    for module, params in view.modules.items():
        g = acc.setdefault(role(module, view.config), {"formats": Counter(), "modules": 0, "tensors": 0, "bytes": 0})
        fmt = module_format(params)
        if fmt is None:  # bias-only or scale-only modules (e.g. KV-cache scales) count under their dtype
            fmt = next(iter(params.values())).st_dtype.lower()
        g["formats"][fmt] += 1
        g["modules"] += 1
        g["tensors"] += len(params)
        g["bytes"] += sum(t.nbytes for t in params.values())
    order = {name: i for i, name in enumerate(GROUP_ORDER)}
    return [{"group": name, "formats": dict(sorted(g["formats"].items(), key=lambda kv: -kv[1])),
             "modules": g["modules"], "tensors": g["tensors"], "bytes": g["bytes"]}
            for name, g in sorted(acc.items(), key=lambda kv: order.get(kv[0], len(order)))]


def _architecture(view: Checkpoint) -> dict:
    c = view.config or {}
    archs = c.get("architectures") or []
    experts = {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in view.infos if ".mlp.experts." in n}
    layers = {int(n.split(".")[2]) for n in view.infos if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    v4 = _v4_layers(view) if is_v4(c) else None
    if v4 is not None:
        experts = {e for n in view.infos if (e := names_v4.expert_of(n)) is not None}
        layers = {b for n in view.infos if (b := names_v4.block_of(n)) and b.startswith("layers.")}
    return {
        "architecture": archs[0] if archs else None,
        "model_type": c.get("model_type"),
        "num_hidden_layers": c.get("num_hidden_layers"),
        "first_k_dense_replace": c.get("first_k_dense_replace"),
        "num_nextn_predict_layers": c.get("num_nextn_predict_layers"),
        "n_routed_experts": c.get("n_routed_experts"),
        "n_shared_experts": c.get("n_shared_experts"),
        "num_experts_per_tok": c.get("num_experts_per_tok"),
        "layers_stored": len(layers),
        "experts_stored": len(experts),
        "v4": v4,
    }


def _v4_layers(view: Checkpoint) -> dict | None:
    """DeepSeek-V4 layer kinds from config.json: attention kinds, hash-routed layers, the draft, expert_dtype."""
    try:
        blocks = names_v4.blocks(view.config)
    except (KeyError, TypeError, ValueError):
        return None  # inspect --check names the field
    backbone = [b for b in blocks if b.draft is None]
    return {"attention": dict(Counter(b.attention for b in backbone)),
            "hash_layers": sum(b.hash_routing for b in backbone),
            "draft": next((b.draft for b in blocks if b.draft), None), "draft_stages": len(blocks) - len(backbone),
            "expert_dtype": names_v4.expert_dtype(view.config)}


# Tensor-parallel sharding of DeepSeek projections in vLLM/SGLang: column-parallel layers split N, row-parallel
# layers split K (q_a/kv_a and the router are replicated). MoE experts split their intermediate size the same
# way unless expert parallelism is used.
COLUMN_PARALLEL = ("q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
TP_SIZES = (1, 2, 4, 8, 16)


def block_tp_limit(view: Checkpoint) -> dict | None:
    """Largest TP size whose shards keep whole 128x128 scale blocks (vLLM `validate_fp8_block_shape`).

    Returns {"max_tp", "block", "limited_by"} for checkpoints with block-scaled weights, else None;
    limited_by is the first module that the next TP size would cut inside a block (None past TP 16).
    """
    block = ((view.quantization_config or {}).get("weight_block_size") or [128, 128])[0]
    dims = []
    for module, params in view.modules.items():
        fmt = module_format(params) or ""
        w = params.get("weight")
        if not fmt.endswith("-block") or w is None or len(w.shape) != 2:
            continue
        leaf = module.rsplit(".", 1)[-1]
        if leaf in COLUMN_PARALLEL:
            dims.append((w.shape[0], module))
        elif leaf in ROW_PARALLEL:
            dims.append((w.shape[1], module))
    if not dims:
        return None
    best, limited_by = 1, None
    for tp in TP_SIZES:
        bad = next((m for d, m in dims if d % (tp * block)), None)
        if bad is not None:
            limited_by = bad
            break
        best = tp
    return {"max_tp": best, "block": block, "limited_by": limited_by}


def summarize_checkpoint(path: str | Path) -> dict:
    """Summary of the checkpoint `path` (a directory, or hf://org/name[@rev]) as a JSON-ready dict.

    Keys: path, architecture (config facts and what is stored), convention, declared (quantization
    configs), module_conventions (naming seen in tensors), groups (per tensor group: formats with module
    counts, modules, tensors, bytes), tensors, bytes, shards, consistency ({ok, index, total_size,
    declared_total_size, problems}). Raises ValueError (CheckpointError) if `path` is not a checkpoint.
    """
    return summarize_view(survey(path))


def summarize_view(view: Checkpoint) -> dict:
    problems = structure.check(view)
    conventions = Counter(c for p in view.modules.values() if (c := convention_of_module(p)))
    return {
        "path": view.location,
        "architecture": _architecture(view),
        "convention": detect_convention(view),
        "declared": _declared(view),
        "module_conventions": dict(conventions),
        "groups": _groups(view),
        "tensors": len(view.infos),
        "bytes": view.total_bytes,
        "shards": len(view.shard_files),
        "block_tp_limit": block_tp_limit(view),
        "consistency": {
            "ok": not any(f.severity == "error" for f in problems) and view.config is not None,
            "config": view.config is not None,
            "index": view.index is not None,
            "total_size": view.total_bytes,
            "declared_total_size": view.declared_total_size,
            "problems": [str(f) for f in problems],
        },
    }


def format_summary(s: dict) -> str:
    """The human-readable table `dsquant inspect` prints."""
    a = s["architecture"]
    lines = [f"checkpoint    {s['path']}",
             f"architecture  {a['architecture'] or '? (no config.json)'} ({a['model_type'] or '?'})"]
    if a["num_hidden_layers"] is not None:
        dense = f", {a['first_k_dense_replace']} dense" if a["first_k_dense_replace"] is not None else ""
        mtp = f" + {a['num_nextn_predict_layers']} MTP" if a["num_nextn_predict_layers"] else ""
        v4 = a.get("v4")
        if v4 is not None:
            kinds = ", ".join(f"{n} {k}" for k, n in v4["attention"].items())
            draft = f" + {v4['draft_stages']} {DRAFT_NAMES[v4['draft']]}" if v4["draft"] else ""
            mtp = f" ({kinds}; {v4['hash_layers']} hash-routed){draft}"
        lines.append(f"layers        {a['num_hidden_layers']} decoder{dense}{mtp}; {a['layers_stored']} stored")
    if a["n_routed_experts"]:
        dtype = f"; expert_dtype {a['v4']['expert_dtype']}" if a.get("v4") else ""
        lines.append(f"experts       {a['n_routed_experts']} routed (top-{a['num_experts_per_tok']}) + "
                     f"{a['n_shared_experts'] or 0} shared; {a['experts_stored']} stored per MoE layer{dtype}")
    declared = "; ".join(f"{k}: {v}" for k, v in s["declared"].items() if k != "families") or "none"
    lines += [f"convention    {s['convention']} (declared: {declared})",
              f"size          {human_bytes(s['bytes'])} in {s['tensors']} tensors, {s['shards']} shard(s)"]
    tp = s.get("block_tp_limit")
    if tp:
        why = (f" (TP {tp['max_tp'] * 2} would cut {tp['limited_by']} inside a {tp['block']}-block)"
               if tp["limited_by"] else "")
        lines.append(f"tensor par.   block-scaled weights shard up to TP {tp['max_tp']}{why}")
    lines.append("")
    rows = [("group", "formats (modules)", "tensors", "bytes")]
    for g in s["groups"]:
        fmts = ", ".join(f"{f} x{n}" for f, n in g["formats"].items())
        rows.append((g["group"], fmts, str(g["tensors"]), human_bytes(g["bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}")
    c = s["consistency"]
    lines.append("")
    if c["ok"]:
        lines.append("index, config and shards agree" + ("" if c["index"] else " (single file, no index)"))
    else:
        lines.append("index, config and shards DISAGREE:")
    lines += [f"  {p}" for p in c["problems"]]
    return "\n".join(lines)
