"""Resume bookkeeping and the destination lock.

The manifest (`DST/.dsquant-manifest.json`) records the plan's fingerprint, the run's start time, what the
run was started with (`run`: the source's name and identity, see identity.py, the calibration's digest,
the shard count and the command that finishes it) and every finished output shard with its size and
SHA-256; it is rewritten atomically after each shard. A resumed run checks the source's identity and the
fingerprint (recipe, convention and shard layout), keeps shards whose checksum still matches and redoes
the rest, so the result is byte-identical to an uninterrupted run.

The manifest is removed as the very last step, after the index, configs, recipe record and model card:
a folder with a manifest is an unfinished output, whatever else it holds, and `unfinished_conversion`
is the one place every command asks.

The lock (`DST/.dsquant.lock`, created with O_EXCL) holds the writer's host and pid; a lock whose process is
gone (kill -9) is stale and taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
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
    def __init__(self, dst: Path, fingerprint: str, created: str, shards: dict | None = None, run: dict | None = None):
        self.path = Path(dst) / MANIFEST_NAME
        self.fingerprint = fingerprint
        self.created = created
        self.shards: dict[str, dict] = dict(shards or {})
        self.run: dict = dict(run or {})
        self._lock = threading.Lock()

    @classmethod
    def load(cls, dst: Path) -> "Manifest | None":
        path = Path(dst) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(dst, data["fingerprint"], data["created"], data.get("shards"), data.get("run"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable resume manifest ({e}); delete the destination and start again")

    def save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "created": self.created, "run": self.run,
                                      "shards": dict(sorted(self.shards.items()))})

    def record(self, fname: str, nbytes: int, sha256: str, stats: dict | None = None) -> None:
        """A finished shard; `stats` (numbers measured while writing it) are kept so that a resumed run can
        report them for shards it does not redo."""
        with self._lock:
            self.shards[fname] = {"bytes": nbytes, "sha256": sha256, **({"stats": stats} if stats else {})}
            self.save()

    def merged_stats(self) -> dict:
        """Every recorded shard's stats combined: keys starting with `max_` by maximum, the others summed."""
        out: dict = {}
        for rec in self.shards.values():
            for key, value in (rec.get("stats") or {}).items():
                out[key] = max(out.get(key, value), value) if key.startswith("max_") else out.get(key, 0) + value
        return out

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

    @property
    def resume_command(self) -> str | None:
        """The shell command that finishes this conversion, or None for a manifest that did not record it."""
        command = self.run.get("command")
        return shlex.join(command) if isinstance(command, list) and command else None


def unfinished_conversion(folder) -> str | None:
    """None when `folder` holds no unfinished dsquant conversion (a finished one, or another tool's
    checkpoint); else one line saying it is unfinished and how to finish it. Every command that reads or
    publishes a checkpoint asks this, so that a half-written output is never taken for a model."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.load(folder)
    except ValueError as e:
        return f"{folder}: unfinished conversion, and {e}"
    done, total = len(manifest.shards), manifest.run.get("shards", "?")
    how = (f"`{manifest.resume_command}`" if manifest.resume_command else
           f"`dsquant convert SRC {shlex.quote(str(folder))} --resume` with the options it was started with")
    return f"{folder}: unfinished conversion ({done} of {total} output shards written); finish it with {how}"


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
