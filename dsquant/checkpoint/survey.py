"""Open a checkpoint made by any tool for inspection: what can be read is read, what is wrong is listed.

Only JSON files and safetensors *headers* are read when the survey is made (the 8-byte length, then the
JSON header), so a 671B checkpoint of 163 shards opens in well under a second per shard and nothing is
unpickled. Missing or unreadable shards, tensors past the end of their file, index entries outside the folder,
tensors stored twice, and index/shard disagreements become `Checkpoint.problems`; only a folder that is not a
checkpoint at all raises CheckpointError. `hf://org/name[@rev]` is read through HTTP range requests on the
headers (HfApi.get_safetensors_metadata): no weights are downloaded.
"""

from __future__ import annotations

from pathlib import Path

from dsquant.checkpoint.index import (
    HF_QUANT_CONFIG,
    INDEX_NAME,
    RECIPE_FILE,
    CheckpointError,
    ShardProblem,
    TensorInfo,
    index_weight_map,
    outside_folder,
    parse_entry,
    read_json,
    survey_header,
)
from dsquant.checkpoint.reader import Checkpoint

_JSON_FILES = (
    ("config", "config.json"),
    ("hf_quant_config", HF_QUANT_CONFIG),
    ("recipe", RECIPE_FILE),
    ("index", INDEX_NAME),
)


def survey(spec: str | Path, api=None) -> Checkpoint:
    """A local checkpoint directory, or `hf://org/name[@rev]` (headers only, through `api`, an HfApi by
    default). ValueError (CheckpointError for local paths) names what could not be read."""
    if not str(spec).startswith("hf://"):
        return survey_local(Path(spec))
    from dsquant.checkpoint.hub_source import hub_errors, parse_hf_spec

    repo, rev = parse_hf_spec(str(spec))
    with hub_errors(str(spec), repo, rev, probe=api is None):
        return survey_hub(repo, rev, api=api)


def survey_local(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    ck = Checkpoint.blank(path)
    for attr, name in _JSON_FILES:
        setattr(ck, attr, read_json(path / name, name))
    for fname in _shard_list(ck):
        if why := outside_folder(path, fname):
            ck.problems.append(ShardProblem(fname, why))
            continue
        if not (path / fname).is_file():
            ck.problems.append(ShardProblem(fname, f"{fname}: listed in the index but missing"))
            continue
        try:
            infos, problems = survey_header(path / fname, fname)
        except ValueError as exc:
            ck.problems.append(ShardProblem(fname, str(exc)))
            continue
        ck.problems += problems
        _add_shard(ck, fname, infos.values())
    _check_index_agrees(ck)
    return ck


def survey_hub(repo_id: str, revision: str | None = None, api=None) -> Checkpoint:
    """Headers of a Hub checkpoint without downloading its weights: the JSON files are fetched, and the
    safetensors headers come from HTTP range requests."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError

    api = api or HfApi()
    files = frozenset(api.list_repo_files(repo_id, revision=revision))
    ck = Checkpoint.blank(f"hf://{repo_id}")
    ck.remote, ck.remote_files = f"{repo_id}@{revision or 'main'}", files
    for attr, name in _JSON_FILES:
        data = None
        if name in files:
            try:
                data = read_json(Path(api.hf_hub_download(repo_id, name, revision=revision)), name)
            except EntryNotFoundError:
                pass
        setattr(ck, attr, data)
    if not any(f.endswith(".safetensors") for f in files):
        raise CheckpointError(f"hf://{repo_id}: no *.safetensors file in the repository")
    if ck.index is not None:
        ck.weight_map = index_weight_map(ck.index, INDEX_NAME)
    meta = api.get_safetensors_metadata(repo_id, revision=revision)
    for fname, fmeta in meta.files_metadata.items():
        infos = []
        for name, t in fmeta.tensors.items():
            entry = {"dtype": t.dtype, "shape": t.shape, "data_offsets": t.data_offsets}
            try:
                infos.append(parse_entry(fname, name, entry, 0))
            except ValueError as exc:
                ck.problems.append(ShardProblem(fname, str(exc), name))
        _add_shard(ck, fname, infos)
    if ck.index is not None:
        for fname in sorted(set(ck.weight_map.values()) - set(ck.shard_files)):
            ck.problems.append(ShardProblem(fname, f"{fname}: listed in the index but missing"))
    _check_index_agrees(ck)
    return ck


def _shard_list(ck: Checkpoint) -> list[str]:
    if ck.index is not None:
        ck.weight_map = index_weight_map(ck.index, INDEX_NAME)
        return ck.files
    found = sorted(p.name for p in ck.path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{ck.path}: no {INDEX_NAME} and no *.safetensors file")
    return found


def _add_shard(ck: Checkpoint, fname: str, infos) -> None:
    """Record a readable shard's tensors; without an index, the headers are the weight map."""
    ck.shard_files.append(fname)
    for info in infos:
        if info.name in ck.infos:
            ck.problems.append(
                ShardProblem(fname, f"{info.name} is stored in both {ck.infos[info.name].file} and {fname}", info.name)
            )
        ck.infos[info.name] = info
        if ck.index is None:
            ck.weight_map[info.name] = fname


def _check_index_agrees(ck: Checkpoint) -> None:
    if ck.index is None:
        return
    readable = set(ck.shard_files)
    for name, fname in ck.weight_map.items():
        info: TensorInfo | None = ck.infos.get(name)
        if fname in readable and (info is None or info.file != fname):
            where = f" (found in {info.file})" if info is not None else ""
            ck.problems.append(ShardProblem(fname, f"index maps {name} to {fname}, which lacks it{where}", name))
    for name, info in ck.infos.items():
        if name not in ck.weight_map:
            ck.problems.append(
                ShardProblem(info.file, f"{info.file} holds {name}, which the index does not list", name)
            )
