"""The test session sees the libraries a user has: the checkout's kernels/ must never stand in for theirs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def test_transformers_deepseek_models_import_in_the_test_session():
    # transformers imports Hugging Face's `kernels`; the checkout's kernels/ folder once hid it here.
    for module in ("deepseek_v3", "deepseek_v32", "deepseek_v4"):
        importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    from transformers import DeepseekV3ForCausalLM  # noqa: F401


def test_top_level_kernels_is_not_the_checkout():
    mod = sys.modules.get("kernels")
    if mod is None:
        try:
            mod = importlib.import_module("kernels")
        except ImportError:
            return  # Hugging Face's kernels is optional; what matters is that ours does not answer to the name
    origin = Path(getattr(mod, "__file__", "") or "").resolve()
    assert CHECKOUT / "kernels" not in origin.parents, f"`import kernels` found the checkout's folder: {origin}"


def test_project_kernels_import_as_dsquant_kernels():
    import dsquant.kernels

    assert Path(dsquant.kernels.__file__).resolve().parent == CHECKOUT / "kernels"
