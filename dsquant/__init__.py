"""dsquant: quantize DeepSeek-family checkpoints, with the Triton kernels that compute in those formats."""

from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"
__all__ = ["__version__"]

# In a source checkout (no install), `kernels/` and `recipes/` sit beside this package while the
# installed layout has them as dsquant.kernels / dsquant.recipes (pyproject package-dir). Adding
# the checkout root to this package's search path gives the same import names in both cases, so
# `python -m pytest` works on a machine where nothing can be installed (the lent GPU).
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - package __path__
