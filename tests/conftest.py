"""Shared test setup: the `gpu` marker skips without CUDA; interpreter fixes apply under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout on sys.path, where its kernels/ folder would hide Hugging Face's
# `kernels` package, which transformers imports. The project's kernels are always `dsquant.kernels`, and the
# test modules reach each other through the `tests` package that pytest already registered, so the checkout
# itself is dropped from the path before anything imports transformers. dsquant is imported first, so that an
# uninstalled checkout (the GPU machine) keeps it: its subpackages resolve through dsquant.__path__.
import dsquant  # noqa: E402, F401

_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
_shadow = sys.modules.get("kernels")
if _shadow is not None and Path(getattr(_shadow, "__file__", None) or ".").resolve().parent == _CHECKOUT / "kernels":
    del sys.modules["kernels"]

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_fixes

    interpreter_fixes.apply()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
