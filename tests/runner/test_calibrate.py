"""Calibration through the streamed pass: recorded inputs, per-layer sample memory, idle experts, partners, KV amax."""

from __future__ import annotations

import pytest
import torch

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.formats.nvfp4 import NVFP4_GLOBAL_DIVISOR
from dsquant.runner.cache import PagedLatentCache
from dsquant.runner.calibrate import Calibration, finish, record
from dsquant.runner.load import load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("c") / "v3", variant="v3", source="fp8", num_shards=1)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _direct_layer0(ckpt, windows):
    """Layer 0 run directly (no streaming): its attention input and the latent rows its cache stores."""
    model, _ = load_model(ckpt)
    a = model.args
    stored = []
    cache = PagedLatentCache(1, windows.shape[0], windows.shape[1], a.kv_lora_rank, a.qk_rope_head_dim)[0]
    store = cache.store
    cache.store = lambda kv_c, k_pe, pos: (stored.append(torch.cat([kv_c, k_pe], -1)), store(kv_c, k_pe, pos))
    with torch.no_grad():
        h = model.embed(windows)
        x = model.model.layers[0].input_layernorm(h)
        model.model.layers[0](h, 0, model.rope(windows.shape[1], h.device), cache)
    return x, torch.cat(stored)


def test_amax_method_matches_a_direct_forward_and_partners_share(ckpt, windows):
    cal = finish(ckpt, record(ckpt, windows, method="amax", batch_size=1))
    x, latent = _direct_layer0(ckpt, windows)
    q_a = cal.input_scales["model.layers.0.self_attn.q_a_proj"]
    assert q_a == pytest.approx(float(x.abs().max()) / NVFP4_GLOBAL_DIVISOR, rel=1e-6)
    assert cal.input_scales["model.layers.0.self_attn.kv_a_proj_with_mqa"] == q_a
    assert cal.input_scales["model.layers.0.mlp.up_proj"] == cal.input_scales["model.layers.0.mlp.gate_proj"]
    assert "model.layers.0.self_attn.o_proj" in cal.input_scales and "lm_head" not in cal.input_scales
    # the KV amax is taken over the rows the cache stores (normed kv_c and roped k_pe), both batches
    assert cal.kv_amax[0] == pytest.approx(float(latent.abs().max()), rel=1e-6)
    assert set(cal.kv_amax) == set(range(3))


def test_mse_samples_are_bounded_per_layer(ckpt, windows):
    cap = 4
    cal = finish(ckpt, record(ckpt, windows, method="mse", sample_rows=cap, batch_size=1))
    # largest layer: a MoE layer samples q_a (256), q_b (256), o (512), 8 experts gate (256) and down (128),
    # shared gate (256) and down (128), float32 rows: only the leader of each fused pair keeps rows
    widths = 256 + 256 + 512 + 8 * (256 + 128) + 256 + 128
    assert 0 < cal.peak_sample_bytes <= cap * widths * 4
    for name, errors in cal.errors.items():  # every sampled linear ran the search over its candidates
        assert errors and cal.input_scales[name] in errors, name
    assert all(v > 0 for v in cal.input_scales.values())


def test_idle_experts_take_the_largest_scale_of_their_projection(ckpt):
    p = "model.layers.1.mlp.experts"
    cal = Calibration({f"{p}.0.gate_proj": 3.0, f"{p}.2.gate_proj": 5.0, f"{p}.2.down_proj": 7.0,
                       "model.layers.2.self_attn.q_a_proj": 2.0}, {}, "mse", 8)
    s = finish(ckpt, cal).input_scales
    assert s[f"{p}.0.gate_proj"] == 3.0 and s[f"{p}.0.up_proj"] == 3.0  # seen: its own value, shared with up
    assert s[f"{p}.1.gate_proj"] == 5.0 and s[f"{p}.1.up_proj"] == 5.0  # idle: the layer's largest gate scale
    assert s[f"{p}.5.down_proj"] == 7.0 and s[f"{p}.0.down_proj"] == 7.0
    assert s["model.layers.2.self_attn.kv_a_proj_with_mqa"] == 2.0
    assert not any(k.startswith("model.layers.2.mlp.experts") for k in s)  # nothing seen: converter default
    # idle experts are counted per MoE layer (what convert warns about): experts 0 and 2 of layer 1 were seen
    args = load_model(ckpt)[0].args
    moe = [layer for layer in range(args.n_layers) if args.is_moe_layer(layer)]
    assert 1 in moe and cal.n_routed_experts == args.n_routed_experts
    want = {layer: args.n_routed_experts - (2 if layer == 1 else 0) for layer in moe}
    assert cal.idle_experts == want


def test_kv_scales_are_amax_over_448_clamped_to_one():
    cal = Calibration({}, {0: 896.0, 1: 44.8, 2: 0.0}, "mse", 8)
    assert cal.kv_scales() == {0: 2.0, 1: 1.0, 2: 1.0}
    assert cal.kv_scales(clamp=False) == pytest.approx({0: 2.0, 1: 0.1, 2: 1.0})
    assert cal.saturating_layers() == {0: 896.0}  # what a scale-1.0 FP8 cache would clip


def test_unknown_method_is_refused(ckpt, windows):
    with pytest.raises(ValueError, match="--calib-method 'max'"):
        record(ckpt, windows, method="max")
