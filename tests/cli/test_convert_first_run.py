"""`dsquant convert` as a first-time user meets it: --calibrate only where something is calibrated, the time
reported includes calibration, --push-to-hub checks the token before any work, `demo` names the bundled model
as SRC so that DST can be named, no warning on an ordinary local run, decimal units in the bar."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm
from typer.testing import CliRunner

from dsquant.cli import app
from dsquant.demo import demo_model_dir

runner = CliRunner()
TEXT = Path(__file__).read_text()


@pytest.mark.parametrize("recipe", ["int8", "fp8-block", "mxfp4"])
def test_calibrate_is_refused_where_there_is_nothing_to_calibrate(tmp_path, monkeypatch, recipe):
    import dsquant.runner.calibrate as cal

    monkeypatch.setattr(cal, "calibrate_all", None)  # the pass must not even start
    (tmp_path / "t.txt").write_text(TEXT)
    r = runner.invoke(app, ["convert", "demo", str(tmp_path / "out"), "-r", recipe, "--calibrate",
                            str(tmp_path / "t.txt")])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert f"--calibrate: recipe {recipe} has no NVFP4 weights, so there is no activation scale" in r.output
    assert not (tmp_path / "out").exists()


def test_the_reported_time_includes_calibration(tmp_path, monkeypatch):
    import dsquant.runner.calibrate as cal

    def slow_calibration(*args, **kwargs):
        time.sleep(2.0)
        return cal.Calibration({}, {}, "mse", 1)

    monkeypatch.setattr(cal, "calibrate_all", slow_calibration)
    (tmp_path / "t.txt").write_text(TEXT)
    r = runner.invoke(app, ["convert", "demo", str(tmp_path / "out"), "-r", "nvfp4-experts-only", "--calibrate",
                            str(tmp_path / "t.txt")])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = re.search(r", ([\d.]+) s \(([\d.]+) s calibrating\), ", r.stdout)
    assert m, r.stdout
    total, calibrating = float(m.group(1)), float(m.group(2))
    assert calibrating >= 2.0 and total > calibrating


@pytest.mark.parametrize("token,whoami,message", [
    (None, None, "--push-to-hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login`"),
    ("hf_expired", 401, "--push-to-hub: the Hugging Face token was refused (invalid or expired)"),
], ids=["no-token", "refused"])  # fmt: skip
def test_push_to_hub_checks_the_token_before_converting(tmp_path, monkeypatch, token, whoami, message):
    from huggingface_hub.errors import HfHubHTTPError

    import dsquant.checkpoint.hub_source as hub_source
    import dsquant.publish as publish

    class FakeApi:
        def __init__(self, token=None):
            pass

        def whoami(self):
            response = SimpleNamespace(status_code=whoami, headers={}, request=None)
            raise HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(publish, "get_token", lambda: token)
    monkeypatch.setattr(publish, "HfApi", FakeApi)
    monkeypatch.setattr(hub_source, "check_reachable", lambda what: None)  # no request leaves the test
    r = runner.invoke(app, ["convert", "demo", str(tmp_path / "out"), "-r", "int8", "--push-to-hub", "org/name"])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_demo_as_src_names_the_bundled_model_so_dst_can_be_named(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        r = runner.invoke(app, ["convert", "demo", "mine", "-r", "int8"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mine" / "config.json").is_file()
    assert str(demo_model_dir()) in r.stdout
    # an ordinary local conversion is quiet: nothing at WARNING or above (the card's missing Hub id is not news)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.text
    assert "WARNING" not in r.output


def test_a_local_folder_named_demo_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    r = runner.invoke(app, ["convert", "demo", "out", "-r", "int8"])
    assert r.exit_code == 1 and "demo" in r.output and not (tmp_path / "out" / "config.json").exists()


def test_the_progress_bar_counts_in_decimal_units(tmp_path, capsys):
    from dsquant.convert import convert

    s = convert(None, tmp_path / "out", "int8", progress=True)
    err = capsys.readouterr().err
    assert f"{tqdm.format_sizeof(s.bytes_in, divisor=1000)}/{tqdm.format_sizeof(s.bytes_in, divisor=1000)}" in err


def test_sizes_are_decimal():
    from dsquant.units import human_bytes

    assert [human_bytes(n) for n in (999, 1000, 6_019_988, 689e9, None)] == [
        "999 B", "1.00 KB", "6.02 MB", "689.00 GB", "?"]  # fmt: skip
