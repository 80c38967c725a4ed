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


def test_demo_adds_a_calibrated_row_for_nvfp4(tmp_path, monkeypatch):
    import sysconfig

    import dsquant.cli.cmd_demo as cmd_demo

    monkeypatch.setattr(cmd_demo, "CALIBRATION_TOKENS", 512)  # the path, not the figure, is under test
    # the demo's texts ship with it: a Python without its stdlib source gives the same table
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path / "no-stdlib")})
    r = runner.invoke(app, ["demo", "--recipe", "nvfp4-experts-only", "--max-tokens", "256", "--seq-len", "128",
                            "--out", str(tmp_path / "out"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)["results"]}
    assert set(rows) == {"nvfp4-experts-only", "nvfp4-experts-only+calib"}
    from safetensors import safe_open

    def input_scale(name):
        f = tmp_path / "out" / name / "model-00001-of-00001.safetensors"
        with safe_open(f, "pt") as fh:
            return float(fh.get_tensor("model.layers.1.mlp.experts.0.gate_proj.input_scale"))

    assert input_scale("nvfp4-experts-only") == 1.0  # the recipe default

    def declared(name):
        return json.loads((tmp_path / "out" / name / "dsquant_recipe.json").read_text())["activation_scales"]

    # a calibrated scale may equal 1.0 (the search picks powers of two), so the record says which it is
    assert (declared("nvfp4-experts-only"), declared("nvfp4-experts-only+calib")) == ("default", "calibrated")


def test_demo_reports_each_step_as_a_plain_line(tmp_path):
    r = runner.invoke(app, ["demo", "--recipe", "fp8-block", "--max-tokens", "512", "--seq-len", "128",
                            "--out", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr
    assert "demo: convert: 1/1 checkpoints (100%)" in lines[0], r.stderr
    assert lines[-1].startswith("eval: 1,024/1,024 tokens (100%), ") and lines[-1].endswith(" done"), r.stderr
    assert r.stdout.startswith("demo: 508 tokens of python3.12.1 stdlib (heldout text shipped with dsquant)")


def test_every_default_demo_recipe_converts_the_demo_model(tmp_path):
    """`dsquant demo` with no --recipe runs demo_recipes(): each must accept the bundled V3 model (a V4-only
    recipe in the list stops the whole demo)."""
    from dsquant.cli.cmd_demo import demo_recipes
    from dsquant.convert import convert
    from dsquant.demo import demo_model_dir
    from dsquant.recipe_files import shipped_recipes

    names = demo_recipes()
    assert "nvfp4" in names and "fp8-block" in names
    for name in names:
        convert(demo_model_dir(), tmp_path / name, name, dry_run=True, progress=False)
    assert {n for n, _ in shipped_recipes()} - set(names) == {n for n, _ in shipped_recipes() if n.startswith("v4-")}
