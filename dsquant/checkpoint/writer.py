"""A streaming safetensors writer: header first, tensors in order, checksum on the fly, atomic rename.

The header is built from the planned (name, dtype, shape) list, so every byte offset is known before
any tensor exists; tensors (or raw bytes of copied tensors) are then written in that order while a
SHA-256 is computed, and the file only appears under its final name after flush + fsync + rename
(and an fsync of the folder). The same plan always gives the same bytes: no timestamps, fixed order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from dsquant.checkpoint.index import TORCH_TO_ST


def partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header (space-padded to 8 bytes) for tensors laid out in the given order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write one safetensors shard whose tensor list is known in advance.

    Usage: `w = ShardWriter(path, entries)`, then `w.write(name, tensor_or_bytes)` for each entry in order,
    then `sha256 = w.commit()`; `w.abort()` removes the partial file after an error.
    """

    def __init__(self, path: Path, entries, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        self._next = 0
        self._hash = hashlib.sha256()
        self._tmp = partial_name(self.path)
        self._file = open(self._tmp, "wb")
        self.bytes_written = 0
        try:
            self._put(build_header(self.entries, metadata or {"format": "pt"}))
        except BaseException:
            self.abort()
            raise

    def _put(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"no space left on the device while writing {self.path}") from e
            raise
        self._hash.update(data)
        self.bytes_written += len(data)

    def write(self, name: str, data: torch.Tensor | bytes) -> None:
        """Write the next planned tensor: a tensor of the planned dtype and shape, or its exact raw bytes."""
        assert self._next < len(self.entries), f"{self.path.name}: unplanned tensor {name}"
        want_name, dtype, shape = self.entries[self._next]
        assert name == want_name, f"{self.path.name}: expected tensor {want_name}, got {name}"
        if isinstance(data, torch.Tensor):
            assert data.dtype == dtype and tuple(data.shape) == tuple(shape), (
                f"{name}: planned {dtype} {tuple(shape)}, got {data.dtype} {tuple(data.shape)}")
            data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy
        assert len(data) == math.prod(shape) * dtype.itemsize, f"{name}: wrong byte count {len(data)}"
        self._put(data)
        self._next += 1

    def commit(self) -> str:
        """Flush, fsync, rename to the final name; return the file's SHA-256 (hex)."""
        assert self._next == len(self.entries), f"{self.path.name}: {len(self.entries) - self._next} tensors missing"
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"no space left on the device while writing {self.path}") from e
            raise
        self._file.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self._hash.hexdigest()

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)
