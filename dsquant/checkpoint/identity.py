"""What a resumed conversion binds its source by: each weight shard's size, header and sampled contents.

A resume keeps the output shards of the interrupted run and converts the rest from the source given now,
so both runs must read the same weights. The tensor layout cannot tell: DeepSeek-V3 and R1 (and a model
and its fine-tune) have the same names, shapes, shard files and byte offsets, so their headers, the
weight_map and every file size can be equal too. What differs is the tensor data, so for each shard:

- `bytes` and `header` (SHA-256 of the safetensors header): a re-sharded or re-saved file, cheaply;
- `sample` (SHA-256 of SAMPLES windows of WINDOW bytes spread evenly over the data section, the last
  byte included): a different model of the same layout, whose weights differ nearly everywhere, from
  about 64 KiB per shard (a few MB for a 163-shard model) instead of every byte (690 GB for V3 in FP8);
- `blob`: where the file is a Hugging Face cache link, its blob's name, which is the SHA-256 of the whole
  file as the Hub computed it (a full content hash for free).

For hf:// sources the Hub commit the snapshot was taken at is bound as well: a branch that moved since the
run started is refused (naming both commits) even where its weights did not change. A local copy of a
snapshot has no commit and is compared by the file checks alone.

Modification times are not bound: a copy, a move to another disk or a re-download of the same bytes
changes them without changing the model (a refusal that would cost a full restart for nothing), and an
edit in place can keep them. Not caught: an edit confined to bytes between the sampled windows that keeps
the file size and header (one tensor patched in place in a local, non-cache copy). Hashing every byte
would catch it at the cost of reading the whole source again before each resume.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dsquant.checkpoint.index import read_raw_header

SAMPLES = 16
WINDOW = 4096
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def shard_identity(path: Path) -> dict:
    """{bytes, header, sample[, blob]} of one safetensors file (see the module docstring)."""
    _, start, size = read_raw_header(path)
    out = {"bytes": size}
    span = size - start
    offsets = sorted({start + (span - WINDOW) * i // (SAMPLES - 1) for i in range(SAMPLES)}) if span > WINDOW \
        else [start]
    fd = os.open(path, os.O_RDONLY)
    try:
        out["header"] = hashlib.sha256(os.pread(fd, start, 0)).hexdigest()
        sample = hashlib.sha256()
        for off in offsets:
            sample.update(os.pread(fd, WINDOW, off))
        out["sample"] = sample.hexdigest()
    finally:
        os.close(fd)
    target = Path(os.path.realpath(path)).name
    if path.is_symlink() and _SHA256_NAME.fullmatch(target):
        out["blob"] = target
    return out


def source_identity(folder: Path, files: list[str]) -> dict:
    """{"commit": Hub commit or None, "files": {shard: shard_identity}} of a checkpoint folder."""
    folder = Path(folder)
    commit = folder.name if folder.parent.name == "snapshots" and _COMMIT.fullmatch(folder.name) else None
    return {"commit": commit, "files": {f: shard_identity(folder / f) for f in sorted(files)}}


def identity_difference(recorded: dict, now: dict) -> str | None:
    """None when two source identities agree, else what differs first, in words."""
    if None not in (recorded.get("commit"), now.get("commit")) and recorded["commit"] != now["commit"]:
        return f"Hub commit {recorded['commit']} vs {now['commit']}"
    old, new = recorded.get("files") or {}, now.get("files") or {}
    if sorted(old) != sorted(new):
        return f"shard files {sorted(set(old) ^ set(new))[:3]} are in only one of them"
    for f in sorted(old):
        for key, what in (("bytes", "size"), ("header", "safetensors header"), ("blob", "contents"),
                          ("sample", "contents")):
            a, b = old[f].get(key), new[f].get(key)
            if a != b and (key != "blob" or None not in (a, b)):  # a copy out of the Hub cache has no blob name
                return f"{f} differs in its {what}"
    return None
