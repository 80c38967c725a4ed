"""Resume bookkeeping and the destination lock.

The manifest (`DST/.dsquant-manifest.json`) records the plan's fingerprint, the run's start time and every
finished output shard with its size and SHA-256; it is rewritten atomically after each shard. A resumed run
checks the fingerprint (same source, recipe, convention and shard layout), keeps shards whose checksum
still matches and redoes the rest, so the result is byte-identical to an uninterrupted run. The manifest is
removed when the output is complete: a folder with a manifest is a partial output.

The lock (`DST/.dsquant.lock`, created with O_EXCL) holds the writer's host and pid; a lock whose process is
gone (kill -9) is stale and taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path

from dsquant.checkpoint.index import write_json_atomic

MANIFEST_NAME = ".dsquant-manifest.json"
LOCK_NAME = ".dsquant.lock"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Manifest:
    def __init__(self, dst: Path, fingerprint: str, created: str, shards: dict | None = None):
        self.path = Path(dst) / MANIFEST_NAME
        self.fingerprint = fingerprint
        self.created = created
        self.shards: dict[str, dict] = dict(shards or {})
        self._lock = threading.Lock()

    @classmethod
    def load(cls, dst: Path) -> "Manifest | None":
        path = Path(dst) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(dst, data["fingerprint"], data["created"], data.get("shards"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable resume manifest ({e}); delete the destination and start again")

    def save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "created": self.created,
                                      "shards": dict(sorted(self.shards.items()))})

    def record(self, fname: str, nbytes: int, sha256: str) -> None:
        with self._lock:
            self.shards[fname] = {"bytes": nbytes, "sha256": sha256}
            self.save()

    def verified(self, dst: Path) -> set[str]:
        """Finished shards whose file is present with the recorded size and checksum."""
        ok = set()
        for fname, rec in self.shards.items():
            path = Path(dst) / fname
            if path.is_file() and path.stat().st_size == rec["bytes"] and sha256_file(path) == rec["sha256"]:
                ok.add(fname)
        return ok

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DstLock:
    """Exclusive writer lock on a destination folder (context manager)."""

    def __init__(self, dst: Path):
        self.path = Path(dst) / LOCK_NAME

    def __enter__(self) -> "DstLock":
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    owner = {}
                if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                        and not _pid_alive(owner["pid"]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise ValueError(f"{self.path.parent}: another dsquant run (host {owner.get('host')}, pid "
                                 f"{owner.get('pid')}) is writing this destination; wait for it, or delete "
                                 f"{self.path} if that run is gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            return self
        raise ValueError(f"{self.path}: could not take the destination lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
