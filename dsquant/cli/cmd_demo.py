"""`dsquant demo`."""

from __future__ import annotations

from dsquant.cli.app import app, not_available


@app.command("demo")
def demo() -> None:
    """Not available in this version yet (Step 5, the bundled demo model)."""
    not_available("demo", "Step 5, the bundled demo model")
