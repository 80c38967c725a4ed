"""Calibration through the streamed pass: recorded input amax and the idle-expert fallback."""

from __future__ import annotations

import pytest
import torch

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.formats.nvfp4 import NVFP4_GLOBAL_DIVISOR
from dsquant.runner.calibrate import nvfp4_input_scales, record_input_amax
from dsquant.runner.load import load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("c") / "v3", variant="v3", source="fp8", num_shards=1)


def test_recorded_amax_matches_a_direct_forward(ckpt):
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    amax = record_input_amax(ckpt, windows, batch_size=1)
    model, _ = load_model(ckpt)
    with torch.no_grad():  # layer 0's q_a_proj sees input_layernorm(embedding) directly
        x = model.model.layers[0].input_layernorm(model.embed(windows))
    assert amax["model.layers.0.self_attn.q_a_proj"] == pytest.approx(float(x.abs().max()), rel=1e-6)
    assert amax["model.layers.0.self_attn.kv_a_proj_with_mqa"] == amax["model.layers.0.self_attn.q_a_proj"]
    assert "model.layers.0.self_attn.o_proj" in amax and "lm_head" not in amax  # only decoder layers stream


def test_idle_experts_fall_back_to_the_layers_max(ckpt):
    p = "model.layers.1.mlp.experts"
    amax = {f"{p}.0.gate_proj": 3.0, f"{p}.2.gate_proj": 5.0, f"{p}.2.down_proj": 7.0}
    scales = nvfp4_input_scales(ckpt, amax)
    assert scales[f"{p}.0.gate_proj"] == pytest.approx(3.0 / NVFP4_GLOBAL_DIVISOR)
    assert scales[f"{p}.1.gate_proj"] == pytest.approx(5.0 / NVFP4_GLOBAL_DIVISOR)  # idle: layer max
    assert scales[f"{p}.5.down_proj"] == pytest.approx(7.0 / NVFP4_GLOBAL_DIVISOR)
    assert f"{p}.1.up_proj" not in scales  # nothing recorded for that projection: converter default
