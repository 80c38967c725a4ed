"""Interrupted conversions for the resume tests: a child process SIGKILLed at a chosen point, and the output
tree compared byte for byte (less the creation time, which only the recipe record and the card quote)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs one conversion in a child process and SIGKILLs it at a chosen point: the n-th tensor write
# (mid-shard), right after the n-th shard is renamed but before the manifest records it, when the
# finalize step starts writing configs (all shards and the index done), or when it starts writing the
# model card (index, configs, copied files and recipe record all done).
_KILLER = r"""
import os, sys
import dsquant.checkpoint.writer as w
import dsquant.convert.pipeline as c
import dsquant.model_card as mc
src, dst, recipe, point, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
hits = {"n": 0}
def hit():
    hits["n"] += 1
    if hits["n"] == n:
        os.kill(os.getpid(), 9)
if point == "write":
    orig_write = w.ShardWriter.write
    def write(self, *a):
        hit()
        return orig_write(self, *a)
    w.ShardWriter.write = write
elif point == "commit":
    orig_commit = w.ShardWriter.commit
    def commit(self):
        out = orig_commit(self)
        hit()
        return out
    w.ShardWriter.commit = commit
elif point == "configs":
    orig_configs = c.write_configs
    def configs(*a):
        hit()
        return orig_configs(*a)
    c.write_configs = configs
elif point == "card":
    orig_card = mc.write_model_card
    def card(*a, **kw):
        hit()
        return orig_card(*a, **kw)
    mc.write_model_card = card
c.convert(src, dst, recipe, max_shard_size="1MB", progress=False)
"""


def run_child(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def kill_conversion(src, dst, recipe: str, point: str, n: int) -> subprocess.CompletedProcess:
    """convert(src, dst, recipe, max_shard_size="1MB") in a child, SIGKILLed at the n-th `point`."""
    return run_child(_KILLER, src, dst, recipe, point, n)


def output_tree(dst: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()}
    record = json.loads(files.pop("dsquant_recipe.json"))
    created = record.pop("created")
    files["dsquant_recipe.json"] = json.dumps(record, sort_keys=True).encode()
    if "README.md" in files:  # the model card quotes the creation time; nothing else may differ
        files["README.md"] = files["README.md"].replace(created.encode(), b"<created>")
    return files


def disk_state(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (hidden ones included) with its bytes and mtime (ns), less the names in `skip`."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}
