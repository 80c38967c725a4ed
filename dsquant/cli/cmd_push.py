"""`dsquant push DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message M] [--dry-run]`."""

from __future__ import annotations

from pathlib import Path

import typer

from dsquant.cli.app import app, fail


@app.command("push")
def push(
    folder: Path = typer.Argument(..., help="A finished `dsquant convert` output directory."),
    repo_id: str = typer.Option(..., "--repo-id", help="Target model repo, ORG/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: str | None = typer.Option(None, "--revision", show_default=False,
                                        help="Branch to push to (created if missing) [default: main]."),
    commit_message: str | None = typer.Option(None, "--commit-message", show_default=False,
                                              help="Commit message [default: Upload DIR (dsquant)]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and bytes that would be uploaded."),
    no_check: bool = typer.Option(False, "--no-check", help="Push even if `dsquant inspect --check` finds errors."),
) -> None:
    """Publish a converted checkpoint to the Hugging Face Hub, refreshing its model card first. A checkpoint
    that fails the engine loading checks (`dsquant inspect DIR --check`) is not pushed.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. Interrupted uploads resume
    when the same command is run again.

    Examples:

    \b
      dsquant push ./V3-nvfp4 --repo-id my-org/DeepSeek-V3-NVFP4 --dry-run
      dsquant push ./V3-nvfp4 --repo-id my-org/DeepSeek-V3-NVFP4 --private
    """
    from dsquant.publish import push_to_hub
    from dsquant.units import human_bytes

    try:
        result = push_to_hub(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                             dry_run=dry_run, check=not no_check)
    except ValueError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"push to {repo_id} interrupted; run the same command again to resume the upload", code=130)
    except Exception as exc:  # network/HTTP errors from huggingface_hub: one line, no traceback
        fail(f"push to {repo_id} failed: {type(exc).__name__}: {exc} (run the same command again to resume)")
    where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
    if dry_run:
        for path, size in result.files:
            typer.echo(f"{size:>15,d}  {path}")
        typer.echo(f"dry run: would upload {len(result.files)} files, {human_bytes(result.total_bytes)} "
                   f"({result.total_bytes:,d} bytes) to {where}")
        return
    typer.echo(f"pushed {len(result.files)} files, {human_bytes(result.total_bytes)} to {where}: {result.url}")
