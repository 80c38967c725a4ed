"""The runner loads every variant and every format the converter writes, with the right scale directions."""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels.testing import calc_diff

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.runner.load import load_model


@pytest.mark.parametrize("variant", ["v3", "v2-lite", "kimi-k2", "v3.2"])
def test_synthetic_variants_load_and_run(tmp_path, variant):
    ckpt = make_synthetic_checkpoint(tmp_path / variant, variant=variant, source="fp8", num_shards=2)
    model, reader = load_model(ckpt)
    x = torch.randint(0, reader.args.vocab_size, (1, 12))
    logits = model(x)
    assert logits.shape == (1, 12, reader.args.vocab_size) and torch.isfinite(logits).all()
    if variant == "v2-lite":
        assert not reader.args.q_lora_rank and hasattr(model.model.layers[0].self_attn, "q_proj")


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("src") / "v3", variant="v3", source="bf16",
                                     num_shards=2)  # fmt: skip


# Relative error (calc_diff) of the dequantized weight against the source: FP8/INT8 ~1e-4 in practice,
# FP4 formats ~1e-2 (DeepGEMM's per-format thresholds, kernels/testing.py). A reciprocal taken the wrong
# way gives ~1, a wrong nibble order ~0.5.
CASES = [("fp8-block", "auto", 1e-3), ("int8", "auto", 1e-3), ("nvfp4", "modelopt", 2e-2),
         ("nvfp4", "compressed-tensors", 2e-2), ("mxfp4", "auto", 3e-2)]  # fmt: skip


@pytest.mark.parametrize("recipe,convention,max_diff", CASES, ids=[f"{r}-{c}" for r, c, _ in CASES])
def test_converted_checkpoints_load_in_their_format(tmp_path, bf16_source, recipe, convention, max_diff):
    from dsquant.convert import convert

    dst = tmp_path / "out"
    convert(bf16_source, dst, recipe, convention=convention, progress=False)
    model, _ = load_model(dst)
    src, _ = load_model(bf16_source)
    fmts = set()
    for name, mod in model.named_modules():
        w = getattr(mod, "w", None)
        if w is None or w.fmt == "bf16":
            continue
        fmts.add(w.fmt)
        ref = src.get_submodule(name).w.dequantize()
        d = calc_diff(w.dequantize(), ref)
        assert d < max_diff, f"{recipe}/{convention} {name} ({w.fmt}): calc_diff {d:.2e}"
    assert fmts, f"{recipe}: no quantized linear found"
    x = torch.randint(0, model.args.vocab_size, (1, 10))
    assert torch.isfinite(model(x)).all()
