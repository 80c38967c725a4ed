"""What a conversion wrote as NVFP4 activation scales, read from its index and shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def written_input_scales(dst: Path) -> dict[str, torch.Tensor]:
    """{module: its stored `input_scale` tensor} over every shard of the checkpoint in dst."""
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        if name.endswith(".input_scale"):
            with safe_open(str(dst / shard), "pt") as f:
                out[name.removesuffix(".input_scale")] = f.get_tensor(name)
    return out
