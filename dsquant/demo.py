"""The demo model `dsquant convert` uses when no SRC is given.

`demo_model_dir()` returns the bundled trained demo model (dsquant/assets/demo/) when the package ships
one (`demo_model_dir(V4)`: the bundled DeepSeek-V4 demo, dsquant/assets/demo-v4/); otherwise
a deterministic random-weight DeepSeek-V3-shaped FP8 checkpoint, built once with
dsquant.checkpoint.synth into the cache ($DSQUANT_CACHE, else ~/.cache/dsquant) and reused afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dsquant.checkpoint.names import V3, V4
from dsquant.checkpoint.synth import make_synthetic_checkpoint

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo"
V4_ASSET_DIR = ASSET_DIR.parent / "demo-v4"
# The demo's own settings (context length, evaluation size), kept beside its weights and copied with them into
# every conversion of it.
SETTINGS_FILE = "dsquant_demo.json"
SYNTH_NAME = "dsquant-demo-random-v3-fp8"
# Bump when the synthetic demo's shape or contents change, so stale caches are rebuilt.
SYNTH_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("DSQUANT_CACHE") or Path.home() / ".cache" / "dsquant")


def demo_model_dir(family: str = V3) -> Path:
    """Folder of the demo checkpoint (bundled trained model, else the cached random-weight one); family
    V4: the bundled DeepSeek-V4 demo."""
    if family == V4:
        return V4_ASSET_DIR
    if (ASSET_DIR / "config.json").is_file():
        return ASSET_DIR
    target = cache_dir() / f"{SYNTH_NAME}-{SYNTH_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a killed build never leaves a half checkpoint in the cache.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        make_synthetic_checkpoint(tmp / "ckpt", variant="v3", source="fp8", num_shards=2, seed=0)
        if not target.exists():  # another process may have finished first
            os.replace(tmp / "ckpt", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_settings(ckpt) -> dict:
    """The demo's recorded settings when `ckpt` is the demo or a conversion of it, else {}."""
    path = Path(ckpt) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def context_length(ckpt, args) -> tuple[int, str]:
    """(longest sequence the model handles, where that comes from): the demo's trained window, else the
    config's max_position_embeddings."""
    n = demo_settings(ckpt).get("context_length")
    if n:
        return int(n), f"the length it was trained at, per {SETTINGS_FILE}"
    return int(args.max_position_embeddings), "max_position_embeddings in config.json"
