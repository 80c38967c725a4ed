"""`dsquant convert`."""

from __future__ import annotations

from dsquant.cli.app import app, not_available


@app.command("convert")
def convert() -> None:
    """Not available in this version yet (Step 2, the streaming converter)."""
    not_available("convert", "Step 2, the streaming converter")
