"""Lazy re-exports for kernel packages: Triton modules load on first use, so references import without Triton."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, home: dict[str, str]):
    """Module `__getattr__` / `__dir__` pair that resolves `name` from `package.<home[name]>` on first access."""
    module_globals = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        module_globals[name] = value
        return value

    def __dir__():
        return sorted(set(module_globals) | set(home))

    return __getattr__, __dir__
