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
    assert list(out) == ["deepseek_v3"]  # only the requested recipe's family has a table
    row = out["deepseek_v3"]["results"][0]
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
    rows = {row["name"]: row for row in json.loads(r.output)["deepseek_v3"]["results"]}
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
    assert r.stdout.startswith("demo (DeepSeek-V3): 508 tokens of python3.12.1 stdlib (heldout text shipped with "
                               "dsquant)")


def test_demo_v4_table_has_calibrated_and_default_nvfp4_rows(tmp_path, monkeypatch):
    import dsquant.cli.cmd_demo as cmd_demo

    monkeypatch.setattr(cmd_demo, "CALIBRATION_TOKENS", 512)
    r = runner.invoke(app, ["demo", "--recipe", "v4-fp8-block", "--recipe", "v4-nvfp4", "--max-tokens", "256",
                            "--seq-len", "128", "--out", str(tmp_path / "out"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert list(out) == ["deepseek_v4"]
    table = out["deepseek_v4"]
    assert table["base"]["name"] == "source (fp8 + mxfp4 experts, V4 release)"
    assert [row["name"] for row in table["results"]] == ["v4-fp8-block", "v4-nvfp4", "v4-nvfp4+calib"]
    for row in table["results"]:
        assert row["bytes"] > 0 and 0 <= row["kld"] < 1 and 0.5 < row["top1"] <= 1

    def declared(name):
        return json.loads((tmp_path / "out" / name / "dsquant_recipe.json").read_text())["activation_scales"]

    assert (declared("v4-nvfp4"), declared("v4-nvfp4+calib")) == ("default", "calibrated")


def test_demo_prints_both_tables_and_what_does_not_apply(tmp_path):
    r = runner.invoke(app, ["demo", "--recipe", "fp8-block", "--recipe", "v4-fp8-block", "--max-tokens", "256",
                            "--seq-len", "128"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("demo (DeepSeek-V3): ") and any(ln.startswith("demo (DeepSeek-V4): ") for ln in lines)
    assert any(ln.startswith("v4-fp8-block ") for ln in lines)
    assert any(ln.startswith("  not shown: v4-mxfp4: the demo ships MXFP4 experts already") for ln in lines)


def test_every_default_demo_recipe_converts_its_family_demo_model(tmp_path):
    """`dsquant demo` with no --recipe runs demo_recipes(None): each recipe must accept the bundled model of the
    family it is listed under (a recipe that refuses its source stops the whole demo)."""
    from dsquant.cli.cmd_demo import V4_NOT_APPLICABLE, demo_recipes
    from dsquant.convert import convert
    from dsquant.demo import demo_model_dir
    from dsquant.recipe_files import shipped_recipes

    tables = demo_recipes(None)
    assert "nvfp4" in tables["deepseek_v3"] and "fp8-block" in tables["deepseek_v3"]
    assert tables["deepseek_v4"] == ["v4-fp8-block", "v4-nvfp4"]
    for family, names in tables.items():
        for name in names:
            convert(demo_model_dir(family), tmp_path / name, name, dry_run=True, progress=False)
    listed = {n for names in tables.values() for n in names}
    assert {n for n, _ in shipped_recipes()} - listed == set(V4_NOT_APPLICABLE)
