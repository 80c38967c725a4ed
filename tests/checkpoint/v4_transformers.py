"""transformers 5.25 as an independent reader and writer of DeepSeek-V4 checkpoints.

`load_official(path)` loads an official-layout checkpoint with DeepseekV4ForCausalLM.from_pretrained: transformers
renames the official names itself (conversion_mapping "deepseek_v4") and, on CPU, dequantizes FP8 and packed FP4
with its own Fp8Dequantize. `save_transformers_namespace(src, dst)` then save_pretrained()s that model, which
writes transformers' mixed namespace (deepseek-v4.md 2.3): the fixture for readers of that namespace comes from
the library itself.

transformers' FP8 quantizer refuses to start without the `accelerate` package, which its CPU dequantization does
not use; accelerate is no dependency of dsquant, so the check is answered for the duration of the load.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

transformers = pytest.importorskip("transformers")


def load_official(path: Path):
    """(model, loading info) of a V4 checkpoint, dequantized to BF16 by transformers on CPU."""
    from transformers import DeepseekV4ForCausalLM

    with mock.patch("transformers.quantizers.quantizer_finegrained_fp8.is_accelerate_available", lambda: True):
        return DeepseekV4ForCausalLM.from_pretrained(path, output_loading_info=True)


def save_transformers_namespace(src: Path, dst: Path) -> Path:
    """What transformers writes for V4: load the official checkpoint `src`, save_pretrained it into `dst`."""
    model, _ = load_official(src)
    model.save_pretrained(dst)
    return dst
