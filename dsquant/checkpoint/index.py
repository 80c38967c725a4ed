"""Safetensors headers, `model.safetensors.index.json` and the checkpoint's JSON files: every problem names its file.

Only safetensors are read (never pickle). A header is validated before any tensor is touched: its
length fits the file, it is JSON, every tensor has a known dtype, a shape whose byte size equals its
data range, and ranges that lie inside the file; so a truncated or corrupt shard is refused up front
(`read_header`), or reported while the rest is still read (`survey_header`, for inspection). An index entry
must name a file inside the checkpoint folder (`outside_folder`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's nested quantization config, beside config.json
RECIPE_FILE = "dsquant_recipe.json"  # what dsquant convert wrote, and how
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype string <-> torch dtype
ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
ST_DTYPE_BYTES = {k: v.itemsize for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """The directory cannot be read as a checkpoint at all (the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype, shape and byte range [start, end) in the file (a remote
    checkpoint's ranges are within the data section: its header length is not known)."""

    name: str
    file: str
    st_dtype: str  # as the header spells it: "BF16", "F8_E4M3", "U8", ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return ST_DTYPES[self.st_dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPE_BYTES[self.st_dtype]

    @property
    def module(self) -> str:
        """`a.b.weight` -> `a.b`; a top-level tensor belongs to the module ""."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def param(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ShardProblem:
    """What a survey found wrong with one shard or tensor (a strict open raises on these instead)."""

    file: str
    message: str
    tensor: str | None = None


def read_json(path: Path, label: str | None = None) -> dict | None:
    """A JSON object file -> dict, None when the file is absent; CheckpointError naming `label` (default: the
    path) when it is not a JSON object."""
    if not path.is_file():
        return None
    label = label or str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{label}: not a JSON object (got {type(data).__name__})")
    return data


def read_raw_header(path: Path) -> tuple[dict, int, int]:
    """One safetensors file's framing -> (header JSON without __metadata__, data section start, file size);
    ValueError if the length prefix or the JSON is corrupt. The entries are not checked here."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path.name}: corrupt safetensors header (declares {n} header bytes, file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def parse_entry(fname: str, name: str, entry: object, base: int) -> TensorInfo:
    """One header entry -> TensorInfo at absolute offsets (data section starts at `base`); ValueError naming the
    file and tensor when its dtype is unknown or its byte range does not match its shape."""
    try:
        dtype = entry["dtype"]
        itemsize = ST_DTYPE_BYTES[dtype]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{fname}: corrupt safetensors header entry for tensor {name!r}: {entry}") from None
    expected = math.prod(shape) * itemsize
    if end - begin != expected or begin < 0:
        raise ValueError(f"{fname}: tensor {name!r} {dtype} {list(shape)} needs {expected} bytes, "
                         f"header gives [{begin}, {end})")
    return TensorInfo(name, fname, dtype, shape, base + begin, base + end)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header -> {tensor name: TensorInfo}."""
    header, base, size = read_raw_header(path)
    out = {name: parse_entry(path.name, name, entry, base) for name, entry in header.items()}
    data_end = max((info.end for info in out.values()), default=base)
    if data_end > size:
        raise ValueError(f"{path.name}: truncated safetensors file: data ends at byte {data_end}, "
                         f"file has {size} bytes")
    return out


def survey_header(path: Path, fname: str) -> tuple[dict[str, TensorInfo], list[ShardProblem]]:
    """read_header that reports instead of raising: a bad entry or a tensor past the end of the file is a
    problem, and the file's other tensors are still listed."""
    header, base, size = read_raw_header(path)
    out, problems = {}, []
    for name, entry in header.items():
        try:
            info = parse_entry(fname, name, entry, base)
        except ValueError as e:
            problems.append(ShardProblem(fname, str(e), name))
            continue
        if info.end > size:
            problems.append(ShardProblem(fname, f"{fname}: tensor {name} ends past the end of the file", name))
        out[name] = info
    return out, problems


def outside_folder(src: Path, fname: object) -> str | None:
    """Why an index file name is refused (it must be a plain file inside SRC: no absolute path, no `..`, no
    link out of the folder), None when it is safe to open."""
    if not isinstance(fname, str) or not fname or os.path.isabs(fname) or ".." in Path(fname).parts:
        return f"{src / INDEX_NAME}: entry {fname!r} points outside the checkpoint folder; refusing it"
    if src.resolve() not in (src / fname).resolve().parents:
        return f"{src / INDEX_NAME}: entry {fname!r} resolves outside the checkpoint folder; refusing it"
    return None


def index_weight_map(index: dict, label: str) -> dict[str, str]:
    """The weight_map of a parsed index; CheckpointError naming `label` when it is not {tensor: file name}."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{label}: has no 'weight_map' object")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(f"{label}: weight_map entry {bad[0]!r} does not name a file")
    return dict(weight_map)


def read_weight_map(src: Path) -> dict[str, str]:
    """{tensor name: shard file} from the index, or from a single model.safetensors."""
    index = read_json(src / INDEX_NAME)
    if index is not None:
        weight_map = index_weight_map(index, str(src / INDEX_NAME))
        if not weight_map:
            raise CheckpointError(f"{src / INDEX_NAME}: has no weight_map")
        for fname in sorted(set(weight_map.values())):
            if why := outside_folder(src, fname):
                raise CheckpointError(why)
            if not (src / fname).is_file():
                raise CheckpointError(f"{src / fname}: shard listed in {INDEX_NAME} is missing")
        return weight_map
    single = src / SINGLE_FILE
    if single.is_file():
        return {name: SINGLE_FILE for name in read_header(single)}
    raise CheckpointError(f"{src}: no {INDEX_NAME} or {SINGLE_FILE}; not a safetensors checkpoint")


def read_tensor_infos(src: Path, weight_map: dict[str, str]) -> dict[str, TensorInfo]:
    """Validate every shard header and check that the index and the headers agree."""
    infos: dict[str, TensorInfo] = {}
    headers = {fname: read_header(src / fname) for fname in sorted(set(weight_map.values()))}
    for name, fname in weight_map.items():
        if name not in headers[fname]:
            raise ValueError(f"{src / fname}: has no tensor {name!r}, which {INDEX_NAME} places there")
        infos[name] = headers[fname][name]
    return infos


def write_index(dst: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json with metadata.total_size and a name-sorted weight_map."""
    data = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(dst / INDEX_NAME, data)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name, fsync, then rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
