"""An unreachable or offline Hub is one clear line that says what to do, for every command that reads from it.

The Hub is a closed local port (HF_ENDPOINT=http://127.0.0.1:9) with short timeouts, in a fresh process, since
huggingface_hub reads HF_ENDPOINT when it is imported; no request leaves the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from dsquant.cli import app

CHECKOUT = Path(__file__).resolve().parents[2]
CLOSED = "http://127.0.0.1:9"


def _run_all(cases: dict[str, tuple[list[str], dict]], tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """Start every case at once (each process spends most of its time importing torch), then collect them."""
    procs = {}
    for name, (args, extra_env) in cases.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=CLOSED, HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2",
                   HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", **extra_env)  # fmt: skip
        procs[name] = subprocess.Popen([sys.executable, "-P", "-m", "dsquant", *args], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_every_hub_failure_is_one_line(tmp_path):
    fake_pyarrow = tmp_path / "site" / "pyarrow"  # present, so that the download is what fails
    fake_pyarrow.mkdir(parents=True)
    (fake_pyarrow / "__init__.py").write_text("")
    (fake_pyarrow / "parquet.py").write_text("")
    site = {"PYTHONPATH": str(tmp_path / "site")}
    results = _run_all({
        "inspect": (["inspect", "hf://org/name"], {}),
        "wikitext2": (["eval", "--dataset", "wikitext2"], site),
        "convert offline": (["convert", "hf://org/name", "out"], {"HF_HUB_OFFLINE": "1"}),
    }, tmp_path)  # fmt: skip
    for name, r in results.items():
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (name, r.stderr[-3000:])
        assert lines[0].startswith("error: ") and "local path" in lines[0], (name, lines[0])
        if "offline" in name:
            assert "HF_HUB_OFFLINE is set" in lines[0], (name, lines[0])
        else:
            assert f"cannot reach the Hugging Face Hub at {CLOSED}" in lines[0], (name, lines[0])
            assert "set HF_HUB_OFFLINE=1" in lines[0], (name, lines[0])
    assert "hf://org/name" in results["inspect"].stderr and "--dataset wikitext2" in results["wikitext2"].stderr
    assert not (tmp_path / "out").exists()


def test_wikitext2_without_pyarrow_names_the_extra_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # importing it fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    r = CliRunner().invoke(app, ["eval", "--dataset", "wikitext2"])
    assert r.exit_code == 1 and "needs pyarrow: pip install 'dsquant[data]'" in r.output, r.output
    extras = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("pyarrow") for dep in extras["data"])

