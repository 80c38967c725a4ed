"""Publishing a dsquant output to the Hugging Face Hub, with its model card.

Tokens come from huggingface_hub's usual places (HF_TOKEN, then the `hf auth login` cache) and are handed
to HfApi only: never printed, logged or written. Uploads are resumable: `upload_large_folder` where the
installed huggingface_hub has it (it caches finished work under DIR/.cache/huggingface), else
`upload_folder`, which from huggingface_hub 1.x streams through hf_xet in adaptive multi-commit batches
and resumes by re-running. A `--revision` branch is created first (`create_branch(exist_ok=True)`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from dsquant.checkpoint.hub_source import hub_errors, validate_repo_id
from dsquant.checkpoint.manifest import unfinished_conversion
from dsquant.model_card import CARD_MARKER, RECIPE_FILE, render_model_card

log = logging.getLogger(__name__)

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
