"""Lazy reading of a validated safetensors checkpoint: tensors fetched by name, never whole shards.

`Checkpoint(path)` reads config.json, the index and every shard header (validated, see index.py). A
tensor is then read on demand from whichever shard holds it (safe_open is memory-mapped, so only that
tensor's bytes are touched), or as a row range (`rows`), or as its raw bytes (`raw`, for byte-exact
copies). Handles are per thread, so worker threads can read concurrently.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from dsquant.checkpoint.index import TensorInfo, read_tensor_infos, read_weight_map
from dsquant.checkpoint.names import FP8_SCALE_SUFFIX
from dsquant.formats.fp8 import FP8_BLOCK, dequantize_fp8_block


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing; a Hugging Face checkpoint needs its config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    return cfg


class Checkpoint:
    """A safetensors checkpoint folder, validated on open and read lazily."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.weight_map = read_weight_map(self.path)
        self.infos: dict[str, TensorInfo] = read_tensor_infos(self.path, self.weight_map)
        self._local = threading.local()

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def _handle(self, fname: str):
        handles = self._local.__dict__.setdefault("handles", {})
        if fname not in handles:
            handles[fname] = safe_open(str(self.path / fname), framework="pt")
        return handles[fname]

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self._handle(info.file).get_tensor(name)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a tensor, reading only those bytes."""
        info = self.infos[name]
        return self._handle(info.file).get_slice(name)[r0:r1]

    def raw(self, name: str) -> bytes:
        """The tensor's stored bytes, exactly (for copies that must stay byte-identical)."""
        info = self.infos[name]
        fd = os.open(self.path / info.file, os.O_RDONLY)
        try:
            data = os.pread(fd, info.nbytes, info.start)
        finally:
            os.close(fd)
        if len(data) != info.nbytes:
            raise ValueError(f"{self.path / info.file}: short read of tensor {name!r} (file truncated?)")
        return data

    def fp8_rows(self, weight: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a DeepSeek FP8 block weight, dequantized to float32; r0 must be a multiple of 128."""
        assert r0 % FP8_BLOCK == 0, f"{weight}: FP8 row chunks start on a 128-row block, got {r0}"
        q = self.rows(weight, r0, r1)
        scale = self.rows(weight + FP8_SCALE_SUFFIX, r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK))
        return dequantize_fp8_block(q, scale, dtype=torch.float32)

    def close(self) -> None:
        self._local.__dict__.pop("handles", None)
