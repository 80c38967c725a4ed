"""`dsquant demo`: converts the bundled model and prints the comparison table (one recipe, few tokens)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dsquant.cli import app

runner = CliRunner()


def test_demo_table_for_one_recipe(tmp_path):
    r = runner.invoke(app, ["demo", "--recipe", "fp8-block", "--max-tokens", "512", "--seq-len", "128",
                            "--out", str(tmp_path / "out"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    row = out["results"][0]
    # The demo ships in FP8-block; re-quantizing it to the same format reproduces its codes exactly.
    assert row["name"] == "fp8-block" and row["kld"] < 1e-9 and row["top1"] == 1.0
    assert (tmp_path / "out" / "fp8-block" / "config.json").is_file()


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "x").write_text("keep me")
    r = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "not empty" in r.output
