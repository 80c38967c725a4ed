"""Checkpoint sources on the Hugging Face Hub: `hf://org/name[@rev]` specs, snapshot downloads, and the one-line
errors every Hub call of dsquant turns its failures into (reachability, gated/missing repos and revisions, offline
cache misses, HTTP refusals).

Tokens come from huggingface_hub's usual places (HF_TOKEN, then the `hf auth login` cache) and are handed
to huggingface_hub only: never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from huggingface_hub import constants, get_session, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
HF_SPEC = re.compile(r"^hf://(?P<repo>[^@\s]+?)(?:@(?P<rev>[^@\s]+))?$")
# What conversion reads from a source repo: configs (config, generation, tokenizer), weights and their
# index, tokenizer files (Kimi-K2 ships tiktoken.model and its tokenizer code, copied, never executed),
# and the model card and license, whose license the output's card copies.
SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "README.md", "LICENSE*"]


def validate_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"repo id {repo_id!r} is not of the form ORG/NAME (letters, digits, '-', '_', '.'; "
                         "no '--' or '..'; at most 96 characters each)")
    return repo_id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


# Libraries huggingface_hub sends requests through (by version); their errors are network failures.
_HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _is_network_error(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0] in _HTTP_LIBRARIES


def _unreachable(what: str, exc: BaseException) -> ValueError:
    return ValueError(f"{what}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(exc).__name__}); "
                      "check the network, or set HF_HUB_OFFLINE=1 to use what the local Hugging Face cache holds, "
                      "or give a local path instead")


def check_reachable(what: str) -> None:
    """One short request to the Hub (HF_HUB_ETAG_TIMEOUT seconds); ValueError naming `what` when it cannot be
    reached. Skipped with HF_HUB_OFFLINE, where only the cache is read."""
    if _offline():
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:
        if _is_network_error(exc):
            raise _unreachable(what, exc) from None
        raise


@contextlib.contextmanager
def hub_errors(what: str, repo: str | None = None, revision: str | None = None, probe: bool = True):
    """Run Hub calls so that any failure is one ValueError line naming `what` and what to do.

    With probe, check_reachable runs first: an unreachable Hub is said at once instead of after
    huggingface_hub's retries (about half a minute of backoff). Callers that pass their own HfApi-like
    object skip it."""
    if probe:
        check_reachable(what)
    try:
        yield
    except GatedRepoError:
        raise ValueError(f"{what}: gated repository; accept its terms on huggingface.co and log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{what}: repository {repo} not found (or private: log in with `hf auth login` or "
                         "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"{what}: revision {revision!r} not found in {repo}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if _offline():
            raise ValueError(f"{what}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; run once "
                             "online (unset HF_HUB_OFFLINE) to fetch it, or give a local path instead") from None
        raise ValueError(f"{what}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} and the files are not "
                         "cached; check the network and rerun (finished files are kept), or give a local path "
                         "instead") from None
    except ValueError:
        raise
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise ValueError(f"{what}: the Hub refused the request (HTTP {status or '?'}); rerun later, or give a "
                         "local path instead") from None
    except Exception as exc:
        if _is_network_error(exc):
            raise _unreachable(what, exc) from None
        raise


def parse_hf_spec(src: str) -> tuple[str, str | None]:
    """'hf://org/name@rev' -> ('org/name', 'rev'); ValueError for anything else."""
    m = HF_SPEC.match(src)
    if not m:
        raise ValueError(f"{src!r}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    repo, rev = m.group("repo"), m.group("rev")
    try:
        validate_repo_id(repo)
    except ValueError as exc:
        raise ValueError(f"{src!r}: {exc}") from None
    return repo, rev


def resolve_source(src: str) -> Path:
    """A local checkpoint directory, or `hf://org/name[@rev]` fetched into the Hugging Face cache.

    Only the files conversion needs are downloaded (SOURCE_PATTERNS). HF_HUB_OFFLINE=1 uses the cache
    only; an interrupted download resumes on the next call (huggingface_hub keeps partial blobs). The
    snapshot is checked for completeness: every shard its index lists must be present.
    """
    if not str(src).startswith("hf://"):
        path = Path(src)
        if not path.is_dir():
            raise ValueError(f"source {src}: not a directory (give a checkpoint directory or hf://ORG/NAME[@REV])")
        return path
    repo, rev = parse_hf_spec(str(src))
    offline = _offline()
    with hub_errors(str(src), repo, rev):
        folder = Path(snapshot_download(repo, revision=rev, allow_patterns=SOURCE_PATTERNS, local_files_only=offline))
    _check_complete(src, folder, offline)
    return folder


def _check_complete(src: str, folder: Path, offline: bool) -> None:
    from dsquant.checkpoint.index import INDEX_NAME, index_weight_map, read_json

    if not (folder / "config.json").is_file():
        raise ValueError(f"{src}: the snapshot has no config.json (not a model checkpoint, or an incomplete cache)")
    index = read_json(folder / INDEX_NAME)
    if index is not None:
        shards = set(index_weight_map(index, str(folder / INDEX_NAME)).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            how = "rerun without HF_HUB_OFFLINE to finish the download" if offline else "rerun to resume the download"
            raise ValueError(f"{src}: {len(missing)} shard(s) missing from the snapshot ({missing[0]}, ...); {how}")
    elif not any(folder.glob("*.safetensors")):
        raise ValueError(f"{src}: no safetensors weights in the snapshot (only safetensors are read)")
