"""A read-only, header-level view of a safetensors checkpoint directory, made by any tool.

Only JSON files and safetensors *headers* are read when the view is built (the 8-byte length,
then the JSON header), so a 671B checkpoint of 163 shards opens in well under a second per shard
and nothing is unpickled. Tensor data is read on demand, for small tensors only (global scales,
FP8 block scales), straight from the byte range the header gives.

Names follow the checkpoint: a tensor `model.layers.3.mlp.experts.7.up_proj.weight_scale` belongs
to module `model.layers.3.mlp.experts.7.up_proj` with parameter `weight_scale`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from dsquant.checkpoint.index import INDEX_NAME, ST_DTYPE_BYTES, ST_DTYPES, read_raw_header


class CheckpointError(ValueError):
    """The directory cannot be read as a checkpoint at all (the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard header describes it."""

    name: str
    dtype: str  # safetensors dtype string: "BF16", "F8_E4M3", "U8", ...
    shape: tuple[int, ...]
    file: str  # shard file name, relative to the checkpoint
    offsets: tuple[int, int]  # byte range inside the data section

    @property
    def nbytes(self) -> int:
        n = ST_DTYPE_BYTES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def param(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ShardProblem:
    """A shard that could not be read, or tensors the index and shards disagree on."""

    kind: str  # missing-shard | corrupt-header | truncated | not-in-shard | stray | outside-dir | duplicate
    file: str
    message: str
    tensor: str | None = None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class CheckpointView:
    """Config files, index and shard headers of one checkpoint directory."""

    path: Path
    config: dict | None = None
    hf_quant_config: dict | None = None
    recipe: dict | None = None
    index: dict | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    problems: list[ShardProblem] = field(default_factory=list)
    shard_files: list[str] = field(default_factory=list)
    _data_start: dict[str, int] = field(default_factory=dict, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # results the rule families share
    remote: str | None = None  # "org/name@rev" for a Hub checkpoint read through header range requests
    remote_files: frozenset[str] = frozenset()
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def location(self) -> str:
        """The directory, or hf://org/name@rev for a remote view."""
        return f"hf://{self.remote}" if self.remote is not None else str(self.path)

    @property
    def can_read_values(self) -> bool:
        """Tensor data is readable (local checkpoints); remote views hold headers only."""
        return self.remote is None

    def files(self) -> set[str]:
        """Names of the files at the checkpoint's top level."""
        if self.remote is not None:
            return {f for f in self.remote_files if "/" not in f}
        return {p.name for p in self.path.iterdir() if p.is_file()}

    @classmethod
    def open(cls, path: str | Path) -> CheckpointView:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        view = cls(path=path)
        view.config = _read_json(path / "config.json")
        view.hf_quant_config = _read_json(path / "hf_quant_config.json")
        view.recipe = _read_json(path / "dsquant_recipe.json")
        view.index = _read_json(path / INDEX_NAME)
        view._load_shards()
        return view

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None = None, api=None) -> CheckpointView:
        """Headers of a Hub checkpoint without downloading its weights: the JSON files are fetched, and
        the safetensors headers come from HTTP range requests (HfApi.get_safetensors_metadata)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError

        api = api or HfApi()
        files = frozenset(api.list_repo_files(repo_id, revision=revision))
        view = cls(path=Path(f"hf://{repo_id}"), remote=f"{repo_id}@{revision or 'main'}", remote_files=files)
        for attr, name in (("config", "config.json"), ("hf_quant_config", "hf_quant_config.json"),
                           ("recipe", "dsquant_recipe.json"), ("index", INDEX_NAME)):
            if name in files:
                try:
                    setattr(view, attr, _read_json(Path(api.hf_hub_download(repo_id, name, revision=revision))))
                except EntryNotFoundError:
                    pass
        if not any(f.endswith(".safetensors") for f in files):
            raise CheckpointError(f"hf://{repo_id}: no *.safetensors file in the repository")
        meta = api.get_safetensors_metadata(repo_id, revision=revision)
        for file, fmeta in meta.files_metadata.items():
            view.shard_files.append(file)
            for tname, t in fmeta.tensors.items():
                if tname in view.tensors:
                    view.problems.append(ShardProblem(
                        "duplicate", file, f"{tname} is stored in both {view.tensors[tname].file} and {file}", tname))
                view.tensors[tname] = TensorInfo(tname, t.dtype, tuple(t.shape), file, tuple(t.data_offsets))
        if view.index is not None:
            for name in sorted(set(view.index.get("weight_map", {}).values()) - set(view.shard_files)):
                view.problems.append(ShardProblem("missing-shard", name, f"{name}: listed in the index but missing"))
        view._check_index_agrees()
        return view

    def _shard_list(self) -> list[str]:
        if self.index is not None:
            wm = self.index.get("weight_map")
            if not isinstance(wm, dict):
                raise CheckpointError(f"{INDEX_NAME}: has no 'weight_map' object")
            bad = [k for k, v in wm.items() if not isinstance(v, str) or not v]
            if bad:
                raise CheckpointError(f"{INDEX_NAME}: weight_map entry {bad[0]!r} does not name a file")
            return sorted(set(wm.values()))
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{self.path}: no {INDEX_NAME} and no *.safetensors file")
        return found

    def _load_shards(self) -> None:
        root = self.path.resolve()
        for name in self._shard_list():
            file = (self.path / name).resolve()
            if not file.is_relative_to(root) or Path(name).is_absolute():
                self.problems.append(
                    ShardProblem("outside-dir", name, f"index names a file outside the checkpoint: {name!r}"))
                continue
            if not file.is_file():
                self.problems.append(ShardProblem("missing-shard", name, f"{name}: listed in the index but missing"))
                continue
            try:
                header, start, _ = read_raw_header(file)
            except ValueError as exc:
                self.problems.append(ShardProblem("corrupt-header", name, str(exc)))
                continue
            self.shard_files.append(name)
            self._data_start[name] = start
            data_len = file.stat().st_size - start
            for tname, meta in header.items():
                try:
                    info = TensorInfo(tname, meta["dtype"], tuple(meta["shape"]), name, tuple(meta["data_offsets"]))
                except (KeyError, TypeError, ValueError) as exc:
                    self.problems.append(
                        ShardProblem("corrupt-header", name, f"{name}: entry {tname!r} malformed ({exc})", tname))
                    continue
                if tname in self.tensors:
                    self.problems.append(ShardProblem(
                        "duplicate", name, f"{tname} is stored in both {self.tensors[tname].file} and {name}", tname))
                if info.offsets[1] > data_len:
                    self.problems.append(
                        ShardProblem("truncated", name, f"{name}: tensor {tname} ends past the end of the file", tname)
                    )
                self.tensors[tname] = info
        self._check_index_agrees()

    def _check_index_agrees(self) -> None:
        if self.index is None:
            return
        wm: dict[str, str] = self.index["weight_map"]
        readable = set(self.shard_files)
        for tname, file in wm.items():
            info = self.tensors.get(tname)
            if file in readable and (info is None or info.file != file):
                where = f" (found in {info.file})" if info is not None else ""
                self.problems.append(
                    ShardProblem("not-in-shard", file, f"index maps {tname} to {file}, which lacks it{where}", tname)
                )
        for tname, info in self.tensors.items():
            if tname not in wm:
                self.problems.append(
                    ShardProblem("stray", info.file, f"{info.file} holds {tname}, which the index does not list", tname)
                )

    # --- derived facts -------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

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
        for info in self.tensors.values():
            out.setdefault(info.module, {})[info.param] = info
        return out

    @property
    def quantization_config(self) -> dict | None:
        qc = (self.config or {}).get("quantization_config")
        return qc if isinstance(qc, dict) else None

    def cfg(self, key: str, default=None):
        return (self.config or {}).get(key, default)

    def read_tensor(self, name: str) -> torch.Tensor:
        """The tensor's data (meant for small tensors: scales), read from its byte range."""
        if self.remote is not None:
            raise ValueError(f"{name}: tensor data is not read from remote checkpoints")
        info = self.tensors[name]
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{name}: dtype {info.dtype} cannot be read")
        fd = self._fds.get(info.file)
        if fd is None:  # one descriptor per shard: rules read tens of thousands of scalars
            fd = self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
        n = info.offsets[1] - info.offsets[0]
        raw = bytearray(os.pread(fd, n, self._data_start[info.file] + info.offsets[0]))
        if len(raw) != n:
            raise ValueError(f"{info.file}: {name} is truncated")
        if not raw:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(info.shape)

    def read_scalar(self, name: str) -> float:
        """A one-element tensor's value as a Python float (struct for float32: rules read ~90k of them)."""
        info = self.tensors[name]
        if self.remote is None and info.dtype == "F32" and info.offsets[1] - info.offsets[0] == 4:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
            return struct.unpack("<f", os.pread(fd, 4, self._data_start[info.file] + info.offsets[0]))[0]
        return float(self.read_tensor(name).float().reshape(-1)[0])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()
