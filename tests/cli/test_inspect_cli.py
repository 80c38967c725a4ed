"""`dsquant inspect CKPT [--json] [--check]`: output, exit codes and every error path."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dsquant.cli import app
from tests.check.ckpt_factory import build

runner = CliRunner()


def test_summary_table(tmp_path):
    path = build("modelopt").write(tmp_path / "c")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "DeepseekV3ForCausalLM" in result.output and "convention    modelopt" in result.output
    assert "routed experts" in result.output and "nvfp4 x12" in result.output
    assert "index, config and shards agree" in result.output
    assert "check:" not in result.output  # no lint without --check


def test_json_summary_and_findings(tmp_path):
    path = build("ct-nvfp4").write(tmp_path / "c")
    result = runner.invoke(app, ["inspect", str(path), "--json", "--check"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["convention"] == "compressed-tensors" and data["findings"] == []
    plain = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).output)
    assert "findings" not in plain and plain["groups"] == data["groups"]


def test_check_passes_with_exit_zero(tmp_path):
    result = runner.invoke(app, ["inspect", str(build("deepseek-fp8").write(tmp_path / "c")), "--check"])
    assert result.exit_code == 0, result.output
    assert "check: no problems found" in result.output


def test_check_errors_exit_one_with_severity_and_rule(tmp_path):
    ck = build("modelopt")
    exclude = ck.hf_quant_config["quantization"]["exclude_modules"] + ["mlp.gate", "model.layers.0.mlp.gate_up_proj"]
    ck.hf_quant_config["quantization"]["exclude_modules"] = ck.config["quantization_config"]["ignore"] = exclude
    result = runner.invoke(app, ["inspect", str(ck.write(tmp_path / "c")), "--check"])
    assert result.exit_code == 1
    assert "ERROR [exclude-overmatch] model.layers.0.mlp.gate_proj:" in result.output
    assert "WARNING [exclude-unmatched]" in result.output
    assert "check: 2 error(s), 2 warning(s)" in result.output  # each list (config.json, hf_quant_config.json)
    data = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "c"), "--check", "--json"]).output)
    assert sorted((f["rule"], f["severity"], f["file"]) for f in data["findings"]) == [
        ("exclude-overmatch", "error", "config.json"), ("exclude-overmatch", "error", "hf_quant_config.json"),
        ("exclude-unmatched", "warning", "config.json"), ("exclude-unmatched", "warning", "hf_quant_config.json")]


def test_warnings_alone_exit_zero(tmp_path):
    ck = build("bf16")
    ck.config["architectures"] = ["SomethingElse"]
    result = runner.invoke(app, ["inspect", str(ck.write(tmp_path / "c")), "--check"])
    assert result.exit_code == 0 and "WARNING [not-deepseek]" in result.output


def test_missing_shard_exits_one_under_check(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    (path / "model-00001-of-00002.safetensors").unlink()
    result = runner.invoke(app, ["inspect", str(path), "--check"])
    assert result.exit_code == 1
    assert "model-00001-of-00002.safetensors: listed in the index but missing" in result.output
    plain = runner.invoke(app, ["inspect", str(path)])
    assert plain.exit_code == 1 and "DISAGREE" in plain.output


def test_not_a_directory(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "not a directory" in result.output


def test_directory_without_weights(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "no model.safetensors.index.json and no *.safetensors" in result.output


def test_config_that_is_not_json(tmp_path):
    path = build("bf16").write(tmp_path / "c")
    (path / "config.json").write_text("{oops")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1 and "config.json: not valid JSON" in result.output


def test_inspect_a_hub_checkpoint_without_downloading_weights(tmp_path, monkeypatch):
    import huggingface_hub

    from tests.test_inspect import FakeHub

    hub = FakeHub(build("ct-mxfp4").write(tmp_path / "c"))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    monkeypatch.setattr("dsquant.checkpoint.hub_source.check_reachable", lambda what: None)  # the fake Hub is local
    result = runner.invoke(app, ["inspect", "hf://org/tiny-mxfp4@main", "--check"])
    assert result.exit_code == 0, result.output
    assert "checkpoint    hf://org/tiny-mxfp4@main" in result.output and "mxfp4 x12" in result.output
    assert "WARNING [values-not-read] org/tiny-mxfp4@main: checked from headers only" in result.output
    assert hub.downloaded and all(f.endswith(".json") for f in hub.downloaded)


def test_bad_hub_spec(tmp_path):
    result = runner.invoke(app, ["inspect", "hf://a/b/c"])
    assert result.exit_code == 1 and "not of the form ORG/NAME" in result.output
