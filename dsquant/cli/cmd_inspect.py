"""`dsquant inspect CKPT [--json] [--check]`."""

from __future__ import annotations

import json

import typer

from dsquant.cli.app import app, fail


@app.command("inspect")
def inspect(
    ckpt: str = typer.Argument(..., help="Checkpoint directory (config.json + safetensors), made by any tool, or "
                               "hf://ORG/NAME[@REV] (headers only: no weights are downloaded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (and findings) as JSON."),
    check: bool = typer.Option(False, "--check", help="Lint against vLLM / SGLang / TensorRT-LLM loading rules; "
                               "exit 1 on any error."),
) -> None:
    """Summarise a checkpoint: architecture, format per tensor group, bytes, and whether index, config and
    shards agree (exit 1 if they do not). With --check, also list what would make vLLM, SGLang or
    TensorRT-LLM refuse it (exit 1 on any error).

    Examples:

    \b
      dsquant inspect ./V3-nvfp4 --check
      dsquant inspect hf://nvidia/DeepSeek-R1-FP4 --json
    """
    from dsquant.check import check_view
    from dsquant.checkpoint.survey import survey
    from dsquant.inspect import format_summary, summarize_view

    try:
        view = survey(ckpt)
    except ValueError as exc:
        fail(str(exc) if str(ckpt) in str(exc) else f"{ckpt}: {exc}")
    summary = summarize_view(view)
    findings = check_view(view) if check else []
    errors = sum(f.severity == "error" for f in findings)
    if as_json:
        if check:
            summary["findings"] = [f.to_dict() for f in findings]
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(format_summary(summary))
        if check:
            typer.echo("")
            for f in findings:
                typer.echo(str(f))
            warnings = len(findings) - errors
            typer.echo(f"check: {errors} error(s), {warnings} warning(s)" if findings else "check: no problems found")
    if errors or not summary["consistency"]["ok"]:  # a checkpoint whose index and shards disagree is broken input
        raise typer.Exit(1)
