"""`dsquant convert --calibrate TEXT --calib-method/--calib-rows`: the method reaches the written scales, and
every wrong use of the options is one clear error before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from dsquant.cli import app
from dsquant.demo import demo_model_dir
from dsquant.runner.calibrate import calibrate

runner = CliRunner()
TEXT = Path(__file__).read_text()


def test_amax_method_writes_the_amax_rule(tmp_path):
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    dst = tmp_path / "out"
    result = runner.invoke(app, ["convert", "-r", "nvfp4-experts-only", "--format", "compressed-tensors",
                                 "--calibrate", str(text_file), "--calib-method", "amax", str(demo_model_dir()),
                                 str(dst)])  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = calibrate(str(demo_model_dir()), TEXT, method="amax")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    checked = 0
    for name, shard in index["weight_map"].items():
        if name.endswith(".input_global_scale"):  # compressed-tensors stores the divisor 1 / scale
            module = name.removesuffix(".input_global_scale")
            with safe_open(str(dst / shard), "pt") as f:
                written = 1.0 / f.get_tensor(name).float().item()
            if module in expected:
                assert written == pytest.approx(expected[module], rel=1e-6), module
                checked += 1
    assert checked > 0
    assert not any("k_scale" in name for name in index["weight_map"])  # KV scales stay out (see calibrate.py)


@pytest.mark.parametrize("args,message", [
    (["--calib-method", "max"], "--calib-method 'max': choose one of mse, amax"),
    (["--calib-rows", "0"], "--calib-rows 0: must be at least 1"),
])  # fmt: skip
def test_bad_calibration_options(tmp_path, args, message):
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    dst = tmp_path / "out"
    result = runner.invoke(app, ["convert", "-r", "nvfp4", "--calibrate", str(text_file), *args,
                                 str(demo_model_dir()), str(dst)])  # fmt: skip
    assert result.exit_code == 1
    assert message in result.output
    assert not dst.exists()


def test_calib_method_without_calibrate_text(tmp_path):
    dst = tmp_path / "out"
    result = runner.invoke(app, ["convert", "-r", "nvfp4", "--calib-method", "amax", str(demo_model_dir()), str(dst)])
    assert result.exit_code == 1
    assert "--calib-method needs --calibrate TEXT_FILE" in result.output
    assert not dst.exists()


def _convert_warnings(tmp_path, monkeypatch, caplog, kv_amax: dict, **found) -> list[str]:
    """Run `convert --calibrate` with the calibration pass replaced by a Calibration holding kv_amax and `found`
    (the pass itself is tested elsewhere; this checks what convert says about it) -> its warning messages."""
    import dsquant.runner.calibrate as calibrate_mod

    def fake(ckpt, text, **kw):
        cal = calibrate_mod.Calibration({}, kv_amax, kw["method"], kw["sample_rows"])
        for attr, value in found.items():
            setattr(cal, attr, value)
        return cal

    monkeypatch.setattr(calibrate_mod, "calibrate_all", fake)
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    with caplog.at_level("INFO", logger="dsquant.cli.cmd_convert"):
        result = runner.invoke(app, ["convert", "-r", "nvfp4", "--calibrate", str(text_file), str(demo_model_dir()),
                                     str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_a_latent_above_448_is_reported(tmp_path, monkeypatch, caplog):
    warnings = _convert_warnings(tmp_path, monkeypatch, caplog, {0: 12.0, 2: 900.0})
    assert any("layer(s) [2]" in w and "900.0" in w and "saturates" in w for w in warnings), warnings


def test_experts_without_calibration_tokens_are_reported(tmp_path, monkeypatch, caplog):
    warnings = _convert_warnings(tmp_path, monkeypatch, caplog, {0: 1.0}, idle_experts={1: 3, 2: 5},
                                 n_routed_experts=8)
    assert any("8 routed expert(s) in 2 MoE layer(s) saw no calibration token (layer 2: 5 of 8)" in w
               for w in warnings), warnings


@pytest.mark.parametrize("kv_amax", [{}, {0: 12.0}], ids=["no_latent_cache", "mla"])
def test_kv_cache_scales_are_logged_only_where_there_are_some(tmp_path, monkeypatch, caplog, kv_amax):
    """DeepSeek-V4 has no MLA latent cache: its calibration has no KV scales, and convert says nothing of them."""
    _convert_warnings(tmp_path, monkeypatch, caplog, kv_amax)
    kv_lines = [r.getMessage() for r in caplog.records if "KV-cache scales" in r.getMessage()]
    assert len(kv_lines) == (1 if kv_amax else 0), kv_lines
