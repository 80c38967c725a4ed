"""Compiling a kernel for sm_90a on a machine without a GPU, for tests that read what Triton and ptxas made of it.

The compile runs in a child process without TRITON_INTERPRET: under the interpreter the @triton.jit helpers are
interpreter functions, which a Gluon kernel cannot call and which take their interpreter paths (the E2M1 decode).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def compile_in_child(code: str, *args: str) -> str:
    """Run `code` (python -c, argv = args) in a child that compiles without the interpreter; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    child = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout


def ptxas_report(ptx: Path) -> str:
    """ptxas -v's report (registers, spills, serialized wgmma warnings) on a PTX file, for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    cubin = ptx.with_suffix(".cubin")
    return subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                          capture_output=True, text=True, check=True).stderr
