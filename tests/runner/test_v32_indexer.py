"""DeepSeek-V3.2 sparse attention: beyond `index_topk` tokens the runner's logits match transformers'
DeepseekV32ForCausalLM (its indexer's top-k), not dense attention; generation past that length is refused."""

from __future__ import annotations

import pytest
import torch

from dsquant.runner.cache import PagedLatentCache
from dsquant.runner.load import load_model

transformers = pytest.importorskip("transformers")

TOPK = 8


def _v32_checkpoint(path, seed=0):
    """A random transformers V3.2 model written by its own save_pretrained (HF names, per-expert tensors)."""
    cfg = transformers.DeepseekV32Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, index_n_heads=8, index_head_dim=16, index_topk=TOPK,
        max_position_embeddings=640, initializer_range=0.15,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms (the indexer's LayerNorm bias too) and router bias
        for name, t in model.state_dict().items():
            if "norm" in name:
                t.copy_((name.endswith("weight")) + 0.2 * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn_like(t))
    model.save_pretrained(path)
    return cfg, model


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_v32_logits_match_transformers_beyond_index_topk(tmp_path):
    cfg, hf = _v32_checkpoint(tmp_path)
    ours, _ = load_model(tmp_path, impl="reference", dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5 * TOPK), generator=torch.Generator().manual_seed(1))
    cache = PagedLatentCache(cfg.num_hidden_layers, 2, tokens.shape[1], cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        actual = ours(tokens)
        cached = ours(tokens, 0, cache)  # the eval path: one prefill window through the latent cache
        for layer in ours.model.layers:
            layer.self_attn.indexer = None
        dense = ours(tokens)
    assert expected.std() > 0.3, "random weights too small to make the comparison meaningful"
    assert _max_rel_err(actual, expected) < 1e-4
    # the cache stores bf16 latents, whose rounding can flip a later layer's top-k for a few positions
    per_position = (cached - expected).abs().amax(-1) / expected.abs().max()
    assert per_position.median() < 1e-2, f"median per-position error {per_position.median():.3e}"
    # the comparison can tell sparse from dense: dense attention is a different model past index_topk
    assert _max_rel_err(dense, expected) > 1e-2
    assert _max_rel_err(dense[:, :TOPK], expected[:, :TOPK]) < 1e-4


def test_v32_decode_beyond_index_topk_is_refused(tmp_path):
    cfg, _ = _v32_checkpoint(tmp_path)
    ours, _ = load_model(tmp_path, impl="reference", dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (1, TOPK + 1), generator=torch.Generator().manual_seed(1))
    cache = PagedLatentCache(cfg.num_hidden_layers, 1, TOPK + 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    with torch.no_grad():
        ours(tokens[:, :TOPK], 0, cache)  # within index_topk: attention is dense, decoding is exact
        with pytest.raises(ValueError, match="index_topk=8"):
            ours(tokens[:, TOPK:], TOPK, cache)
