"""`dsquant convert --calibrate TEXT`: NVFP4 activation scales from the source's own activations."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from dsquant.cli import app
from dsquant.demo import demo_model_dir
from dsquant.runner.calibrate import calibrate
from tests.written_scales import written_input_scales

runner = CliRunner()
TEXT = Path(__file__).read_text()  # any UTF-8 text works; this file is at hand everywhere


def test_calibrated_input_scales_are_written_and_declared(tmp_path):
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    dst = tmp_path / "demo-nvfp4"
    result = runner.invoke(app, ["convert", "--recipe", "nvfp4-experts-only", "--format", "modelopt",
                                 "--calibrate", str(text_file), str(demo_model_dir()), str(dst)])
    assert result.exit_code == 0, result.output
    # the pass reports its progress off a terminal too: plain lines, the last one complete
    assert "\r" not in result.stderr and re.search(r"^calibrate: ([\d,]+)/\1 tokens \(100%\), [\d,]+ tokens/s, done$",
                                                   result.stderr, re.M), result.stderr
    recipe = json.loads((dst / "dsquant_recipe.json").read_text())
    assert recipe["activation_scales"] == "calibrated"
    written = {m: t.float().item() for m, t in written_input_scales(dst).items()}
    expected = calibrate(str(demo_model_dir()), TEXT)
    assert written, "no input_scale tensors in an NVFP4 W4A4 output"
    assert set(written) & set(expected), "no written input_scale comes from the calibration pass"
    for module, value in written.items():
        if module in expected:
            assert abs(value - expected[module]) <= 1e-6 * expected[module], module


def test_calibration_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 64)
    for args, message in ((["--calibrate", str(tmp_path / "missing.txt")], "no such text file"),
                          (["--calibrate", str(tmp_path / "empty.txt")], "empty"),
                          (["--calibrate", str(tmp_path / "model.bin")],
                           f"--calibrate {tmp_path / 'model.bin'}: not UTF-8 text")):
        dst = tmp_path / "out"
        result = runner.invoke(app, ["convert", "-r", "nvfp4", *args, str(demo_model_dir()), str(dst)])
        assert result.exit_code == 1
        assert message in result.output
        assert not dst.exists()
