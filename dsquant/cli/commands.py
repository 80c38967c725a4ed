"""Imports every command module so that its @app.command registers."""

from dsquant.cli import (  # noqa: F401
    cmd_convert,
    cmd_demo,
    cmd_eval,
    cmd_generate,
    cmd_inspect,
    cmd_push,
    cmd_recipes,
)
