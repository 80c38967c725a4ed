"""`dsquant generate`."""

from __future__ import annotations

from dsquant.cli.app import app, not_available


@app.command("generate")
def generate() -> None:
    """Not available in this version yet (Step 5, the runner)."""
    not_available("generate", "Step 5, the runner")
