"""Source identity for --resume: what it tells apart and what it lets through."""

from __future__ import annotations

import hashlib
import shutil

from dsquant.checkpoint.identity import identity_difference, source_identity
from dsquant.checkpoint.reader import Checkpoint


def _hub_snapshot(src, root, commit: str):
    """src laid out as the Hugging Face cache does: snapshots/<commit>/<file> -> ../../blobs/<sha256>."""
    snap = root / "models--org--name" / "snapshots" / commit
    blobs = root / "models--org--name" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    return snap


def test_a_cache_snapshot_and_a_plain_copy_of_it_agree(synth, tmp_path):
    src = synth("v3", "bf16")
    files = Checkpoint(src).files
    snap = _hub_snapshot(src, tmp_path / "hub", "a" * 40)
    cached = source_identity(snap, files)
    assert cached["commit"] == "a" * 40
    assert all(cached["files"][f]["blob"] == hashlib.sha256((src / f).read_bytes()).hexdigest() for f in files)
    plain = source_identity(src, files)
    assert plain["commit"] is None and "blob" not in plain["files"][files[0]]
    assert identity_difference(cached, plain) is None and identity_difference(plain, cached) is None
    other = source_identity(_hub_snapshot(src, tmp_path / "hub2", "b" * 40), files)
    assert identity_difference(cached, other) == f"Hub commit {'a' * 40} vs {'b' * 40}"


def test_one_changed_byte_at_the_end_of_a_shard_is_seen(synth, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth("v3", "bf16"), src)
    files = Checkpoint(src).files
    before = source_identity(src, files)
    shard = src / files[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: same size, same header
    shard.write_bytes(bytes(data))
    assert identity_difference(before, source_identity(src, files)) == f"{files[-1]} differs in its contents"
