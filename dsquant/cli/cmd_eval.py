"""`dsquant eval`."""

from __future__ import annotations

from dsquant.cli.app import app, not_available


@app.command("eval")
def eval() -> None:
    """Not available in this version yet (Step 5, the runner)."""
    not_available("eval", "Step 5, the runner")
