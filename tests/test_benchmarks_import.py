"""The README's rerun commands work from a checkout as written: `python3 benchmarks/bench_<family>.py --help` in
a Python that has torch and Triton but no installed dsquant (its site-packages reached through PYTHONPATH with
site processing off, so no editable-install hook runs), from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (CHECKOUT / "benchmarks").glob("bench_*.py"))


def test_every_benchmark_starts_from_a_checkout_without_install(tmp_path):
    paths = sysconfig.get_paths()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    probe = subprocess.run([sys.executable, "-S", "-c", "import dsquant"], env=env, cwd=tmp_path, capture_output=True,
                           text=True)  # fmt: skip
    assert probe.returncode != 0, "dsquant is importable without the checkout: the check below would prove nothing"
    assert BENCHES, "no benchmarks found"
    procs = {b.name: subprocess.Popen([sys.executable, "-S", str(b), "--help"], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in BENCHES}
    failed = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        if p.returncode != 0 or "usage:" not in out:
            failed[name] = err.strip().splitlines()[-1:] or out[-200:]
    assert not failed, failed
