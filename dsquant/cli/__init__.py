"""Command-line interface. Each command lives in its own module and only maps options to one library call."""

from __future__ import annotations

from dsquant.cli import commands as _commands  # noqa: F401 - registers the commands on `app`
from dsquant.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
