"""Imported first by every benchmark, so that `python3 benchmarks/bench_<family>.py` runs from a checkout with
nothing installed: the checkout's root goes on sys.path, where `dsquant` is found (the package itself adds
kernels/ and recipes/). Siblings such as this module and timing.py resolve because a script's own folder is
sys.path[0]."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
