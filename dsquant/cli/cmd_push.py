"""`dsquant push`."""

from __future__ import annotations

from dsquant.cli.app import app, not_available


@app.command("push")
def push() -> None:
    """Not available in this version yet (Step 6, Hub publishing)."""
    not_available("push", "Step 6, Hub publishing")
