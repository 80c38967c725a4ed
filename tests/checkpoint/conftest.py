"""Synthetic checkpoints shared by the converter tests (built once per session, read-only afterwards)."""

from __future__ import annotations

import pytest

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.convert import convert

# Fewer experts than the generator's default keep the recipe x convention matrix quick on 2 CPU cores;
# every layer kind, the MTP layer and the cross-shard partners are still there.
SMALL = {"n_routed_experts": 4}


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """synth(variant, source, num_shards, seed) -> path of a cached synthetic checkpoint (do not modify it).
    Seeds give models of one layout with different weights (as DeepSeek-V3 and R1)."""
    cache = {}

    def get(variant: str = "v3", source: str = "bf16", num_shards: int = 3, seed: int = 0):
        key = (variant, source, num_shards, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"src-{variant}-{source}")
            overrides = dict(SMALL) if variant != "kimi-k2" else {"n_routed_experts": 6}
            cache[key] = make_synthetic_checkpoint(path, variant=variant, source=source, num_shards=num_shards,
                                                   seed=seed, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference_run(synth, tmp_path_factory):
    """An uninterrupted nvfp4 conversion of synth("v3", "fp8") into a folder named `out`, 1 MB shards."""
    dst = tmp_path_factory.mktemp("ref") / "out"
    convert(synth("v3", "fp8"), dst, "nvfp4", max_shard_size="1MB", progress=False)
    return dst


@pytest.fixture(scope="session")
def synth_v4(tmp_path_factory):
    """synth_v4(variant) -> path of a cached synthetic DeepSeek-V4 checkpoint (do not modify it)."""
    from dsquant.checkpoint.synth_v4 import make_synthetic_v4_checkpoint

    cache = {}

    def get(variant: str = "flash"):
        if variant not in cache:
            cache[variant] = make_synthetic_v4_checkpoint(tmp_path_factory.mktemp(f"v4-{variant}"), variant=variant)
        return cache[variant]

    return get
