"""Shipped recipes: `--recipe NAME` resolves to NAME.toml in this folder."""
