"""The one reader of a safetensors checkpoint: index, headers, config files, and tensors fetched by name.

`Checkpoint(path)` opens strictly (convert, the runner): config.json, the index and every shard header are
validated, and the first problem raises, naming the file (see index.py). `survey(path)` (survey.py) opens
whatever is there for inspection and lists the problems instead, and `survey("hf://org/name")` reads a Hub
checkpoint's headers without its weights. Either way a tensor is then read on demand from whichever shard
holds it (safe_open is memory-mapped, so only that tensor's bytes are touched), or as a row range (`rows`), or
as its raw bytes (`raw`, for byte-exact copies; `read_tensor` and `read_scalar` for small values). Handles are
per thread, so worker threads can read concurrently.

Names follow the checkpoint: a tensor `model.layers.3.mlp.experts.7.up_proj.weight_scale` belongs to module
`model.layers.3.mlp.experts.7.up_proj` with parameter `weight_scale` (`modules`).
"""

from __future__ import annotations

import os
import struct
import threading
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from dsquant.checkpoint.index import (
    HF_QUANT_CONFIG,
    INDEX_NAME,
    RECIPE_FILE,
    CheckpointError,
    ShardProblem,
    TensorInfo,
    read_json,
    read_tensor_infos,
    read_weight_map,
)
from dsquant.checkpoint.names import FP8_SCALE_SUFFIX
from dsquant.formats.fp8 import FP8_BLOCK, dequantize_fp8_block


def read_config(src: Path) -> dict:
    """config.json, which a Hugging Face checkpoint cannot do without."""
    cfg = read_json(src / "config.json")
    if cfg is None:
        raise CheckpointError(f"{src / 'config.json'}: missing; a Hugging Face checkpoint needs its config.json")
    return cfg


class Checkpoint:
    """A safetensors checkpoint folder, validated on open and read lazily."""

    def __init__(self, path: Path | str):
        self._start(Path(path))
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.weight_map = read_weight_map(self.path)
        self.config = read_config(self.path)
        self.infos = read_tensor_infos(self.path, self.weight_map)
        self.shard_files = self.files

    @classmethod
    def blank(cls, path: Path | str, config: dict | None = None) -> Checkpoint:
        """A checkpoint with no tensors yet, for survey.py to fill (and tests to build by hand)."""
        ck = cls.__new__(cls)
        ck._start(Path(path))
        ck.config = config
        return ck

    def _start(self, path: Path) -> None:
        self.path = path
        self.config: dict | None = None
        self.weight_map: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}
        self.shard_files: list[str] = []  # shards whose headers could be read
        self.problems: list[ShardProblem] = []  # what a survey found; a strict open raises instead
        self.remote: str | None = None  # "org/name@rev" for a Hub checkpoint read through header range requests
        self.remote_files: frozenset[str] = frozenset()
        self.cache: dict = {}  # results the check rule families share
        self._local = threading.local()
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()

    # --- config files ----------------------------------------------------------------------

    @cached_property
    def index(self) -> dict | None:
        return read_json(self.path / INDEX_NAME, INDEX_NAME)

    @cached_property
    def hf_quant_config(self) -> dict | None:
        return read_json(self.path / HF_QUANT_CONFIG, HF_QUANT_CONFIG)

    @cached_property
    def recipe(self) -> dict | None:
        return read_json(self.path / RECIPE_FILE, RECIPE_FILE)

    @property
    def quantization_config(self) -> dict | None:
        """config.json's quantization_config, as written."""
        qc = (self.config or {}).get("quantization_config")
        return qc if isinstance(qc, dict) else None

    @property
    def quant_config(self) -> dict:
        """The quantization config a loader follows: config.json's, else hf_quant_config.json's `quantization`
        (ModelOpt's nested form, which SGLang reads when config.json has none); {} when unquantized."""
        qc = dict(self.quantization_config or {})
        if not qc and self.hf_quant_config is not None:
            qc = dict(self.hf_quant_config.get("quantization") or {})
            qc.setdefault("quant_method", "modelopt")
        return qc

    def cfg(self, key: str, default=None):
        return (self.config or {}).get(key, default)

    # --- what is stored ----------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        """The shard files the weight map names."""
        return sorted(set(self.weight_map.values()))

    def folder_files(self) -> set[str]:
        """Names of the files at the checkpoint's top level."""
        if self.remote is not None:
            return {f for f in self.remote_files if "/" not in f}
        return {p.name for p in self.path.iterdir() if p.is_file()}

    @property
    def location(self) -> str:
        """The directory, or hf://org/name@rev for a remote checkpoint."""
        return f"hf://{self.remote}" if self.remote is not None else str(self.path)

    @property
    def can_read_values(self) -> bool:
        """Tensor data is readable (local checkpoints); remote ones hold headers only."""
        return self.remote is None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.infos.values())

    @property
    def declared_total_size(self) -> int | None:
        if self.index is None:
            return None
        size = (self.index.get("metadata") or {}).get("total_size")
        return int(size) if isinstance(size, (int, float, str)) and str(size).isdigit() else None

    @cached_property
    def modules(self) -> dict[str, dict[str, TensorInfo]]:
        """module name -> {param name -> TensorInfo}."""
        out: dict[str, dict[str, TensorInfo]] = {}
        for info in self.infos.values():
            out.setdefault(info.module, {})[info.param] = info
        return out

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    # --- tensor data ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def _handle(self, fname: str):
        handles = self._local.__dict__.setdefault("handles", {})
        if fname not in handles:
            try:
                handles[fname] = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{self.path / fname}: cannot read safetensors header ({e})") from None
        return handles[fname]

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self._handle(info.file).get_tensor(name)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a tensor, reading only those bytes."""
        info = self.infos[name]
        return self._handle(info.file).get_slice(name)[r0:r1]

    def _fd(self, fname: str) -> int:
        # one descriptor per shard, shared by threads (pread keeps no offset): rules read tens of thousands of scalars
        with self._fd_lock:
            if fname not in self._fds:
                self._fds[fname] = os.open(self.path / fname, os.O_RDONLY)
            return self._fds[fname]

    def raw(self, name: str) -> bytes:
        """The tensor's stored bytes, exactly (for copies that must stay byte-identical)."""
        if self.remote is not None:
            raise ValueError(f"{name}: tensor data is not read from remote checkpoints")
        info = self.infos[name]
        data = os.pread(self._fd(info.file), info.nbytes, info.start)
        if len(data) != info.nbytes:
            raise ValueError(f"{self.path / info.file}: short read of tensor {name!r} (file truncated?)")
        return data

    def read_tensor(self, name: str) -> torch.Tensor:
        """The tensor's data copied from its byte range (meant for small tensors: scales)."""
        info = self.infos[name]
        data = bytearray(self.raw(name))
        if not data:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(info.dtype).reshape(info.shape)

    def read_scalar(self, name: str) -> float:
        """A one-element tensor's value as a Python float (struct for float32: rules read ~90k of them)."""
        info = self.infos[name]
        if info.st_dtype == "F32" and info.nbytes == 4:
            return struct.unpack("<f", self.raw(name))[0]
        return float(self.read_tensor(name).float().reshape(-1)[0])

    def fp8_rows(self, weight: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a DeepSeek FP8 block weight, dequantized to float32; r0 must be a multiple of 128."""
        assert r0 % FP8_BLOCK == 0, f"{weight}: FP8 row chunks start on a 128-row block, got {r0}"
        q = self.rows(weight, r0, r1)
        scale = self.rows(weight + FP8_SCALE_SUFFIX, r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK))
        return dequantize_fp8_block(q, scale, dtype=torch.float32)

    def close(self) -> None:
        self._local.__dict__.pop("handles", None)
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        if hasattr(self, "_fds"):
            self.close()
