"""Every command's --help: its defaults are shown (including the ones written into the help text), it has an
example, and no flag shows a `<bool>` metavar."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from dsquant.cli import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def _help(command: str) -> str:
    r = runner.invoke(app, [command, "--help"], terminal_width=120)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())  # wrapping may split a bracket over two lines


def test_every_command_is_covered():
    assert {"convert", "demo", "eval", "generate", "inspect", "push", "recipes"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_an_example(command):
    text = _help(command)
    assert "Example" in text and f"dsquant {command}" in text.split("Example", 1)[1], text
    assert "<bool>" not in text
    cmd = typer.main.get_command(app).commands[command]
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name == "help":
            continue
        written = re.findall(r"\[default: [^\]]+\]", " ".join((p.help or "").split()))
        for d in written:  # a default stated in the help text itself must reach the screen
            assert d in text, (command, p.name, d)
        if p.default not in (None, False, ()) and not written:
            shown = (p.secondary_opts and p.opts[0].lstrip("-")) if p.is_flag else p.default
            assert f"[default: {shown}]" in text, (command, p.name, p.default)
