"""The typer application object and helpers shared by every command module."""

from __future__ import annotations

import logging

import typer

import dsquant

app = typer.Typer(
    name="dsquant",
    help=(
        "Quantize DeepSeek-family checkpoints (V3, R1, V3.1, V3.2, V2-Lite, Kimi-K2) to FP8-block, INT8, "
        "NVFP4 and MXFP4 checkpoints that vLLM, SGLang and TensorRT-LLM load as they are, and check "
        "that they stay accurate.\n\nTypical flow: dsquant convert SRC DST --recipe nvfp4, then "
        "dsquant eval DST --base SRC, then dsquant push DST --repo-id ORG/NAME."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would swallow bracketed text such as [default: ...] and print <bool> metavars.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


# --threads, the same option on every command that runs a model on the CPU (dsquant.devices.cpu_threads).
THREADS = typer.Option(None, "--threads", min=1, show_default=False,
                       help="CPU threads for torch [default: the cores this process may use that are not already "
                            "busy, at least 1].")


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error to stderr and exit non-zero (no traceback for user errors)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def not_available(command: str, step: str) -> None:
    """Placeholder for a command whose implementation has not landed: say so and exit 2."""
    fail(f"`dsquant {command}` is not available in this version yet ({step}).", code=2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsquant {dsquant.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub logs every retry through its own handler and again through the root one; dsquant turns
    # its failures into one line (dsquant.checkpoint.hub_source.hub_errors), so its chatter shows only with --verbose.
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG if verbose else logging.ERROR)
