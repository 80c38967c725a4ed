"""Shared test setup: the `gpu` marker skips without CUDA; interpreter fixes apply under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

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
