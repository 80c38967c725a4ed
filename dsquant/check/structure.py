"""Index, shards and config.json agree with each other.

- index: a shard listed in the index is missing, unreadable or truncated; the index names a file
  outside the checkpoint; a weight_map entry is not in its shard; a shard holds a tensor the index does
  not list (vLLM loads every tensor of the listed files, transformers only the listed ones). Error.
- index-total-size: metadata.total_size differs from the sum of the tensors' bytes. Warning (loaders
  do not need it, but tools that size downloads and disks do).
- unlisted-shard: a *.safetensors file the index does not list (left over from an earlier run). Warning.
- layers: config.json's num_hidden_layers / n_routed_experts disagree with the tensors stored. Error.
- unfinished: the folder is a dsquant conversion that has not finished (checkpoint.manifest decides); its
  files may all be consistent and still hold only part of the model's tensors, or no model card. Error.
"""

from __future__ import annotations

from dsquant.check.finding import Finding
from dsquant.check.names import num_layers
from dsquant.checkpoint.index import INDEX_NAME
from dsquant.checkpoint.manifest import unfinished_conversion
from dsquant.checkpoint.names import expert_index, layer_index
from dsquant.checkpoint.reader import Checkpoint

MAX_LISTED = 3
UNFINISHED = "unfinished"  # the rule name; the converter's own check, run while it finishes, leaves it out


def check(view: Checkpoint) -> list[Finding]:
    unfinished = unfinished_conversion(view.path) if view.remote is None else None
    out = [Finding(UNFINISHED, "error", unfinished)] if unfinished else []
    out += [Finding("index", "error", p.message, tensor=p.tensor, file=p.file) for p in view.problems[:50]]
    if len(view.problems) > 50:
        out.append(Finding("index", "error", f"{len(view.problems) - 50} more index/shard problems not listed",
                           file=INDEX_NAME))
    declared, actual = view.declared_total_size, view.total_bytes
    if view.index is not None and declared is not None and declared != actual and not view.problems:
        out.append(Finding("index-total-size", "warning", f"metadata.total_size is {declared} but the tensors take "
                           f"{actual} bytes", file=INDEX_NAME))
    if view.index is not None:
        listed = set(view.weight_map.values())
        extra = sorted(f for f in view.folder_files() if f.endswith(".safetensors") and f not in listed)
        if extra:
            out.append(Finding("unlisted-shard", "warning", f"{len(extra)} shard file(s) not listed in the index: "
                               f"{', '.join(extra[:MAX_LISTED])}", file=extra[0]))
    out += _layers(view)
    return out


def _layers(view: Checkpoint) -> list[Finding]:
    n = num_layers(view.config)
    if n is None:
        return []
    present = {li for name in view.infos if (li := layer_index(name)) is not None}
    out = []
    missing = [i for i in range(n) if i not in present]
    if missing and present:
        out.append(Finding("layers", "error", f"config.json has num_hidden_layers={n} but decoder layer(s) "
                           f"{missing[:MAX_LISTED]}{'...' if len(missing) > MAX_LISTED else ''} have no tensors",
                           tensor=f"model.layers.{missing[0]}"))
    n_mtp = (view.config or {}).get("num_nextn_predict_layers") or 0
    beyond = sorted(li for li in present if li >= n + (n_mtp if isinstance(n_mtp, int) else 0))
    if beyond:
        out.append(Finding("layers", "error", f"tensors for layer(s) {beyond[:MAX_LISTED]} beyond num_hidden_layers "
                           f"({n}) + num_nextn_predict_layers ({n_mtp})", tensor=f"model.layers.{beyond[0]}"))
    n_exp = (view.config or {}).get("n_routed_experts")
    if isinstance(n_exp, int):
        per_layer: dict[int, set[int]] = {}
        for name in view.infos:
            e = expert_index(name)
            if e is not None:
                per_layer.setdefault(layer_index(name), set()).add(e)
        bad = [f"layer {li}: {len(es)} experts (max id {max(es)})" for li, es in sorted(per_layer.items())
               if es != set(range(n_exp))]
        if bad:
            out.append(Finding("layers", "error", f"config.json has n_routed_experts={n_exp} but "
                               f"{'; '.join(bad[:MAX_LISTED])}", file="config.json"))
    return out
