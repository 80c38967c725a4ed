"""FP8 KV-cache scales: the runner reads a layer's stored k_scale (under each name checkpoints give it) and its
FP8 latent cache stores and reads that layer with it, resident and layer-streamed alike."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.formats.fp8 import FP8_E4M3_MAX
from dsquant.runner.cache import PagedLatentCache
from dsquant.runner.load import load_model
from dsquant.runner.offload import resident_logits, stream_logits

# one name per convention that stores a DeepSeek layer's cache scale
NAMES = {0: "model.layers.0.self_attn.k_scale",  # compressed-tensors kv_cache_scheme / vLLM checkpoint name
         1: "model.layers.1.self_attn.k_proj.k_scale",  # ModelOpt export
         2: "model.layers.2.self_attn.kv_a_proj_with_mqa.k_scale"}  # accepted by SGLang's MLA loader


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("kv") / "v3", variant="v3", source="fp8", num_shards=1)


def with_tensors(src, dst, tensors: dict[str, torch.Tensor]):
    """A copy of checkpoint `src` with extra tensors in their own shard, listed in the index."""
    shutil.copytree(src, dst)
    save_file(tensors, dst / "extra.safetensors")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "extra.safetensors" for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_stored_scales_are_read_per_layer_and_used_by_the_fp8_cache(src, tmp_path):
    scales = {0: 2.0 ** -10, 1: 0.25, 2: 2.0}  # powers of two: x / s is exact; layer 0's saturates E4M3
    ckpt = with_tensors(src, tmp_path / "k", {NAMES[i]: torch.tensor(s, dtype=torch.float32)
                                              for i, s in scales.items()})  # fmt: skip
    model, _ = load_model(ckpt)
    for i, s in scales.items():
        k = model.model.layers[i].self_attn.k_scale
        assert k.dtype == torch.float32 and k.shape == () and float(k) == s
    a = model.args
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    cache = PagedLatentCache(a.n_layers, 2, 8, a.kv_lora_rank, a.qk_rope_head_dim, kv_dtype="fp8")
    seen = {}
    for i, c in enumerate(cache.layers):  # the latent rows each layer hands to its cache, before quantization
        c.store = (lambda kv_c, k_pe, pos, i=i, store=c.store:
                   (seen.__setitem__(i, torch.cat([kv_c, k_pe], -1).reshape(-1, kv_c.shape[-1] + k_pe.shape[-1])),
                    store(kv_c, k_pe, pos)))
    with torch.no_grad():
        model(tokens, 0, cache)
    for i, c in enumerate(cache.layers):
        s = scales.get(i, 1.0)
        assert float(c.kv_scale) == s
        stored = c.pool.view(-1, c.pool.shape[-1])[c._slots(0, 8).flatten()].float()
        expected = (seen[i] / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
        assert torch.equal(stored, expected), i
        kv, pe = c.read(8)  # reading back multiplies by the layer's own scale
        assert torch.equal(torch.cat([kv, pe], -1).reshape(-1, stored.shape[-1]), stored * s)
    assert int((cache[0].pool.float().abs() == FP8_E4M3_MAX).sum()) > 100  # the 2^-10 layer saturates


def test_streaming_uses_the_same_stored_scales_as_the_resident_model(src, tmp_path):
    ckpt = with_tensors(src, tmp_path / "k", {NAMES[0]: torch.tensor(0.05), NAMES[2]: torch.tensor(0.5)})
    windows = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(ckpt)
    resident = torch.cat([lg for _, lg in resident_logits(model, windows, kv_cache="fp8")])
    streamed = torch.cat([lg for _, lg in stream_logits(ckpt, windows, kv_cache="fp8")])
    plain = torch.cat([lg for _, lg in stream_logits(src, windows, kv_cache="fp8")])
    assert torch.equal(resident, streamed)
    assert not torch.equal(streamed, plain)  # the stored scales changed what the cache held


@pytest.mark.parametrize("value,shape", [(-1.0, ()), (float("inf"), ()), (1.0, (2,))])
def test_an_invalid_stored_scale_is_refused_with_its_name(src, tmp_path, value, shape):
    ckpt = with_tensors(src, tmp_path / "bad", {NAMES[1]: torch.full(shape, value)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.k_scale must be one positive"):
        load_model(ckpt)


def test_without_stored_scales_the_cache_uses_one(src):
    model, _ = load_model(src)
    assert all(layer.self_attn.k_scale is None for layer in model.model.layers)
    a = model.args
    cache = PagedLatentCache(a.n_layers, 1, 4, a.kv_lora_rank, a.qk_rope_head_dim, kv_dtype="fp8")
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), 0, cache)
    assert all(float(c.kv_scale) == 1.0 for c in cache.layers)
