"""Safetensors headers and `model.safetensors.index.json`, read strictly: every problem names its file.

Only safetensors are read (never pickle). A header is validated before any tensor is touched: its
length fits the file, it is JSON, every tensor has a known dtype, a shape whose byte size equals its
data range, and ranges that lie inside the file; so a truncated or corrupt shard is refused up front.
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
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype string <-> torch dtype
ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# bytes per element of every safetensors dtype, those torch has no dtype for included (U16..U64)
ST_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range [start, end) in the file."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header -> {tensor name: TensorInfo}."""
    header, base, size = read_raw_header(path)
    out, data_end = {}, 0
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path.name}: corrupt safetensors header entry for tensor {name!r}: {entry}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise ValueError(f"{path.name}: tensor {name!r} {entry['dtype']} {list(shape)} needs {expected} bytes, "
                             f"header gives [{begin}, {end})")
        out[name] = TensorInfo(name, path.name, dtype, shape, base + begin, base + end)
        data_end = max(data_end, end)
    if base + data_end > size:
        raise ValueError(f"{path.name}: truncated safetensors file: data ends at byte {base + data_end}, "
                         f"file has {size} bytes")
    return out


def _safe_member(src: Path, fname: object) -> str:
    """An index file name must be a plain file inside SRC: no absolute path, no `..`, no subfolder escape."""
    if not isinstance(fname, str) or not fname or os.path.isabs(fname) or ".." in Path(fname).parts:
        raise ValueError(f"{src / INDEX_NAME}: entry {fname!r} points outside the checkpoint folder; refusing it")
    resolved = (src / fname).resolve()
    if src.resolve() not in resolved.parents:
        raise ValueError(f"{src / INDEX_NAME}: entry {fname!r} resolves outside the checkpoint folder; refusing it")
    return fname


def read_weight_map(src: Path) -> dict[str, str]:
    """{tensor name: shard file} from the index, or from a single model.safetensors."""
    index = src / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: has no weight_map")
        files = {f: _safe_member(src, f) for f in set(weight_map.values())}
        for fname in sorted(files):
            if not (src / fname).is_file():
                raise ValueError(f"{src / fname}: shard listed in {INDEX_NAME} is missing")
        return dict(weight_map)
    single = src / SINGLE_FILE
    if single.is_file():
        return {name: SINGLE_FILE for name in read_header(single)}
    raise ValueError(f"{src}: no {INDEX_NAME} and no {SINGLE_FILE}; not a safetensors checkpoint")


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
