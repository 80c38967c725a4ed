"""`dsquant inspect`."""

from __future__ import annotations

from dsquant.cli.app import app, not_available


@app.command("inspect")
def inspect() -> None:
    """Not available in this version yet (Step 2, the streaming converter)."""
    not_available("inspect", "Step 2, the streaming converter")
