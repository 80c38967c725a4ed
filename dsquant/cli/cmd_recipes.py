"""`dsquant recipes`: list the shipped recipes."""

from __future__ import annotations

import typer

from dsquant.cli.app import app
from dsquant.recipe_files import shipped_recipes


@app.command("recipes")
def recipes() -> None:
    """List the shipped recipes (use the name with `convert --recipe NAME`).

    Example:

    \b
      dsquant recipes
    """
    for name, summary in shipped_recipes():
        typer.echo(f"{name:<22} {summary}")
