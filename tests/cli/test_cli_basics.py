"""The CLI's top level: version, help, recipes listing, `python -m dsquant`."""

import subprocess
import sys

from typer.testing import CliRunner

import dsquant
from dsquant.cli import app
from dsquant.recipe_files import resolve_recipe_path, shipped_recipes

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dsquant {dsquant.__version__}"


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "inspect", "eval", "generate", "push", "recipes", "demo"):
        assert command in result.output


def test_recipes_lists_each_shipped_recipe_with_a_summary():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    shipped = shipped_recipes()
    assert shipped, "no recipe files are shipped"
    lines = result.output.strip().splitlines()
    assert len(lines) == len(shipped)
    for (name, summary), line in zip(shipped, lines):
        assert summary, f"recipe {name} has no summary comment on its first line"
        assert line.split()[0] == name and summary in line


def test_unknown_recipe_names_the_shipped_ones():
    import pytest

    with pytest.raises(ValueError, match="unknown recipe 'nope'.*fp8-block"):
        resolve_recipe_path("nope")
    with pytest.raises(ValueError, match="recipe file not found"):
        resolve_recipe_path("/nonexistent/recipe.toml")


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "dsquant", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dsquant {dsquant.__version__}"
