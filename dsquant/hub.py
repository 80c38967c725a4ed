"""Hugging Face Hub: fetch `hf://org/name[@rev]` sources, and publish dsquant outputs with their model card.

Tokens come from huggingface_hub's usual places (HF_TOKEN, then the `hf auth login` cache) and are handed
to HfApi only: never printed, logged or written. Uploads are resumable: `upload_large_folder` where the
installed huggingface_hub has it (it caches finished work under DIR/.cache/huggingface), else
`upload_folder`, which from huggingface_hub 1.x streams through hf_xet in adaptive multi-commit batches
and resumes by re-running. A `--revision` branch is created first (`create_branch(exist_ok=True)`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, get_session, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from dsquant.checkpoint.manifest import unfinished_conversion
from dsquant.model_card import CARD_MARKER, RECIPE_FILE, render_model_card

log = logging.getLogger(__name__)

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
HF_SPEC = re.compile(r"^hf://(?P<repo>[^@\s]+?)(?:@(?P<rev>[^@\s]+))?$")
# What conversion reads from a source repo: configs (config, generation, tokenizer), weights and their
# index, tokenizer files (Kimi-K2 ships tiktoken.model and its tokenizer code, copied, never executed),
# and the model card and license, whose license the output's card copies.
SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "README.md", "LICENSE*"]
# Never uploaded: the converter's lock/manifest/partial shards, hidden files, huggingface_hub's upload cache.
UPLOAD_IGNORE = [".*", "*/.*", ".cache/*", "*.partial"]


@dataclass
class PushResult:
    """What push_to_hub did (or, with dry_run, would do)."""

    repo_id: str
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, bytes), sorted
    dry_run: bool = False
    url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)


def validate_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"repo id {repo_id!r} is not of the form ORG/NAME (letters, digits, '-', '_', '.'; "
                         "no '--' or '..'; at most 96 characters each)")
    return repo_id


def check_dsquant_output(folder: Path) -> None:
    """ValueError unless `folder` is a finished dsquant output (config, recipe record, weights; no partial run)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    if unfinished := unfinished_conversion(folder):
        raise ValueError(f"{unfinished} before pushing")
    missing = [n for n in ("config.json", RECIPE_FILE) if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{folder}: not a dsquant output (missing {', '.join(missing)}); "
                         "push the directory `dsquant convert` wrote")


def upload_plan(folder: Path, card: str | None = None) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file an upload of `folder` sends, sorted by path; `card` is the model
    card text to be written as README.md before the upload (its size is the one listed)."""
    import fnmatch

    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in UPLOAD_IGNORE):
            continue
        out[rel] = path.stat().st_size
    if card is not None:
        out["README.md"] = len(card.encode())
    return sorted(out.items())


def _refreshed_card(folder: Path, repo_id: str) -> str | None:
    """The model card to write before uploading, or None to keep a README.md edited by hand."""
    card = folder / "README.md"
    if card.is_file() and CARD_MARKER not in card.read_text(errors="replace"):
        log.info("%s has no dsquant marker (edited by hand?); keeping it as it is", card)
        return None
    return render_model_card(folder, repo_id=repo_id)


def push_to_hub(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False, api=None,
                check: bool = True) -> PushResult:
    """Publish the dsquant output `folder` to the model repo `repo_id`.

    Order: validate -> `dsquant inspect --check` rules (errors refuse the push unless check=False) ->
    render the model card (dry_run stops here, having written nothing) -> write README.md ->
    create_repo(exist_ok=True) -> create_branch(revision) when given -> resumable upload. `api` is an
    HfApi-like object (tests pass a fake); when None, one is built with the token huggingface_hub finds, and
    a missing token is a ValueError before any network call.
    """
    folder = Path(folder)
    validate_repo_id(repo_id)
    check_dsquant_output(folder)
    if check:
        from dsquant.check import check_checkpoint

        errors = [f for f in check_checkpoint(folder) if f.severity == "error"]
        if errors:
            shown = "; ".join(str(f) for f in errors[:3])
            raise ValueError(f"{folder}: fails {len(errors)} engine loading check(s), not pushing: {shown}. "
                             f"See `dsquant inspect {folder} --check` (or push anyway with --no-check)")
    card = _refreshed_card(folder, repo_id)
    result = PushResult(repo_id, revision, upload_plan(folder, card), dry_run=dry_run)
    if dry_run:  # changes nothing on disk: the card that would be written is only measured
        return result
    if card is not None:
        (folder / "README.md").write_text(card)
    if api is None:
        token = get_token()
        if not token:
            raise ValueError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token with "
                             "write access)")
        api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    large = getattr(api, "upload_large_folder", None)
    if large is not None and commit_message is None:
        large(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision, ignore_patterns=UPLOAD_IGNORE)
    else:
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                          commit_message=commit_message or f"Upload {folder.name} (dsquant)",
                          ignore_patterns=UPLOAD_IGNORE)
    result.url = str(repo_url) if repo_url is not None else f"https://huggingface.co/{repo_id}"
    return result


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


def check_token(api=None) -> str:
    """The user name the Hugging Face token belongs to (HfApi.whoami); ValueError when there is no token or the
    Hub refuses it, so that `convert --push-to-hub` stops before converting, not after."""
    token = get_token()
    if not token:
        raise ValueError("--push-to-hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login` (a "
                         "token with write access)")
    with hub_errors("--push-to-hub", probe=api is None):
        api = api or HfApi(token=token)
        try:
            info = api.whoami()
        except HfHubHTTPError as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
                raise ValueError("--push-to-hub: the Hugging Face token was refused (invalid or expired); set "
                                 "HF_TOKEN or run `hf auth login` again") from None
            raise
    return str(info.get("name") or "?")


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
    import json

    if not (folder / "config.json").is_file():
        raise ValueError(f"{src}: the snapshot has no config.json (not a model checkpoint, or an incomplete cache)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            how = "rerun without HF_HUB_OFFLINE to finish the download" if offline else "rerun to resume the download"
            raise ValueError(f"{src}: {len(missing)} shard(s) missing from the snapshot ({missing[0]}, ...); {how}")
    elif not any(folder.glob("*.safetensors")):
        raise ValueError(f"{src}: no safetensors weights in the snapshot (only safetensors are read)")
