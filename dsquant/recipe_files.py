"""Where shipped recipe files live and how `--recipe NAME` resolves to a file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipes_dir() -> Path:
    """The folder of shipped `*.toml` recipes (package data `dsquant.recipes`)."""
    return Path(str(resources.files("dsquant.recipes")))


def shipped_recipes() -> list[tuple[str, str]]:
    """(name, one-line summary) for each shipped recipe; the summary is the file's first comment line."""
    out = []
    for path in sorted(recipes_dir().glob("*.toml")):
        summary = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                summary = line.lstrip("# ").strip()
                break
        out.append((path.stem, summary))
    return out


def resolve_recipe_path(name_or_path: str) -> Path:
    """`nvfp4` -> the shipped nvfp4.toml; an existing path is used as it is."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ValueError(f"recipe file not found: {path}")
        return path
    shipped = recipes_dir() / f"{name_or_path}.toml"
    if not shipped.is_file():
        names = ", ".join(n for n, _ in shipped_recipes()) or "(none)"
        raise ValueError(f"unknown recipe {name_or_path!r}; shipped recipes: {names}")
    return shipped
