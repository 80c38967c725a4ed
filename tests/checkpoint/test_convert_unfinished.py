"""A conversion killed after its index, configs and recipe record were written is still recognised as
unfinished by every command: `inspect --check` reports an error, `eval`, `generate` and `push` refuse it,
each naming the exact `dsquant convert ... --resume` command, and that command finishes it."""

from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from dsquant.checkpoint.manifest import MANIFEST_NAME
from dsquant.cli import app
from tests.checkpoint.interrupt import kill_conversion, output_tree

runner = CliRunner()
COMMAND = re.compile(r"`(dsquant convert [^`]+ --resume)`")


def _killed_at_the_card(src, dst):
    child = kill_conversion(src, dst, "nvfp4", "card", 1)
    assert child.returncode == -9, child.stderr[-2000:]
    # everything a reader looks at is there and consistent; only the model card and the last step are missing
    for name in ("config.json", "model.safetensors.index.json", "dsquant_recipe.json", MANIFEST_NAME):
        assert (dst / name).is_file(), name
    return dst


@pytest.fixture(scope="module")
def unfinished(synth, tmp_path_factory):
    return _killed_at_the_card(synth("v3", "fp8"), tmp_path_factory.mktemp("killed") / "out")


def _resume_command(output: str, dst) -> str:
    m = COMMAND.search(output)
    assert m, output
    assert "\n" not in output.strip() or "[unfinished]" in output, output  # the refusal is one line
    assert str(dst) in m.group(1)
    return m.group(1)


@pytest.mark.parametrize("args", [
    ["inspect", "{dst}", "--check"],
    ["inspect", "{dst}"],
    ["eval", "{dst}", "--seq-len", "64", "--max-tokens", "256"],
    ["eval", "{ref}", "--base", "{dst}", "--seq-len", "64", "--max-tokens", "256"],
    ["generate", "{dst}", "def f(", "-n", "2"],
    ["push", "{dst}", "--repo-id", "me/tiny", "--dry-run"],
], ids=["inspect-check", "inspect", "eval", "eval-base", "generate", "push"])
def test_every_command_recognises_an_unfinished_output(unfinished, reference_run, args):
    result = runner.invoke(app, [a.format(dst=unfinished, ref=reference_run) for a in args])
    assert result.exit_code == 1, result.output
    if args[0] == "inspect":
        if "--check" in args:
            assert "ERROR [unfinished]" in result.output and "check: 1 error(s)" in result.output
        else:  # the summary must not call an unfinished folder consistent
            assert "DISAGREE" in result.output and "agree" not in result.output.replace("DISAGREE", ""), result.output
        line = next(ln for ln in result.output.splitlines() if "[unfinished]" in ln)
        _resume_command(line, unfinished)
    else:
        _resume_command(result.output, unfinished)


def test_the_named_command_finishes_the_conversion(synth, reference_run, tmp_path):
    dst = _killed_at_the_card(synth("v3", "fp8"), tmp_path / "out")
    result = runner.invoke(app, ["inspect", str(dst), "--check"])
    command = shlex.split(_resume_command(result.output, dst))
    assert command[:2] == ["dsquant", "convert"]
    result = runner.invoke(app, command[1:])
    assert result.exit_code == 0, result.output
    assert output_tree(dst) == output_tree(reference_run) and not (dst / MANIFEST_NAME).exists()
    result = runner.invoke(app, ["inspect", str(dst), "--check"])
    assert result.exit_code == 0 and "[unfinished]" not in result.output, result.output
