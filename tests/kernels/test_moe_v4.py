"""DeepSeek-V4 in the MoE kernels vs their references (TRITON_INTERPRET=1 at small shapes, or a GPU): sqrtsoftplus
routing with the selection bias, hash routing by token id, the clamped SwiGLU, NVFP4 experts with input scales.
The references are checked against transformers' DeepseekV4 routers and against the formats' own quantizer."""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels.moe import deepseek_route, deepseek_route_ref, fused_moe, fused_moe_ref
from dsquant.kernels.moe.reference import ExpertWeights, quantize_experts
from dsquant.kernels.testing import assert_close_global, assert_exact

from dsquant.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from tests.kernels.test_moe_kernels import DEV, FMTS, MAX_DIFF, TOPK, E, H, grid_logits, stack_kwargs

# V4-Flash: 256 experts, top-6, scale 1.5; V4-Pro: 384, top-6, 2.5 (one group, always renormalised)
V4_ROUTERS = {"flash": (256, dict(top_k=6, routed_scaling_factor=1.5)),
              "pro": (384, dict(top_k=6, routed_scaling_factor=2.5))}
SQRTSOFTPLUS = dict(scoring="sqrtsoftplus", method="noaux_tc", norm_topk_prob=True)
LIMIT = 0.05  # small enough that the tiny experts' gate/up outputs (|h| up to ~0.2) are clamped


def _v4_logits(t: int, e: int, seed: int) -> torch.Tensor:
    """Grid logits plus the softplus edges: beyond its threshold (x itself) and far below 0 (exp(x) only)."""
    x = grid_logits(t, e, seed)
    x[0, :4] = torch.tensor([20.0, 20.25, 25.0, -30.0], device=x.device)
    x[1, :3] = torch.tensor([-17.5, -40.0, 19.75], device=x.device)
    return x


@pytest.mark.parametrize("name", list(V4_ROUTERS))
def test_deepseek_route_sqrtsoftplus_matches_reference(name):
    e, kw = V4_ROUTERS[name]
    logits = _v4_logits(16, e, seed=e)
    bias = (torch.randint(-4, 5, (e,), generator=torch.Generator().manual_seed(2)).float() / 16).to(DEV)
    w, ids = deepseek_route(logits, bias, **kw, **SQRTSOFTPLUS)
    w_ref, ids_ref = deepseek_route_ref(logits, bias, **kw, **SQRTSOFTPLUS)
    assert_exact(ids, ids_ref, f"{name} topk_ids")
    # log1p(exp(-|x|)) by Goldberg's identity and torch's log1p(exp(x)) round differently: a few ulp of float32.
    torch.testing.assert_close(w, w_ref, rtol=4e-6, atol=0, msg=lambda m: f"{name} weights: {m}")


def test_deepseek_route_sqrtsoftplus_keeps_tiny_scores():
    """A logit of -40 scores sqrt(exp(-40)) = 2.1e-9, not 0: log(1 + u) would round it away."""
    logits = torch.full((1, 8), -41.0, device=DEV)
    logits[0, 3] = -40.0
    w, _ = deepseek_route(logits, top_k=2, norm_topk_prob=False, scoring="sqrtsoftplus", method="greedy")
    expected = torch.tensor([[-20.0, -20.5]]).exp()  # sqrt(softplus(x)) = sqrt(exp(x)) this far below 0
    torch.testing.assert_close(w.cpu(), expected, rtol=4e-6, atol=0)


def test_deepseek_route_hash_matches_reference():
    e, k, vocab, t = 16, 3, 50, 13
    g = torch.Generator().manual_seed(3)
    tid2eid = torch.rand(vocab, e, generator=g).argsort(dim=1)[:, :k].to(DEV)  # int64, as the checkpoints store it
    tokens = torch.randint(0, vocab, (t,), generator=g).to(DEV)
    logits = _v4_logits(t, e, seed=4)
    bias = torch.randn(e, generator=g).to(DEV)  # a hash layer selects nothing: the bias must not matter
    w, ids = deepseek_route(logits, bias, top_k=k, routed_scaling_factor=1.5, tid2eid=tid2eid, token_ids=tokens,
                            **SQRTSOFTPLUS)
    w_ref, ids_ref = deepseek_route_ref(logits, None, top_k=k, routed_scaling_factor=1.5, tid2eid=tid2eid,
                                        token_ids=tokens, **SQRTSOFTPLUS)
    assert_exact(ids, tid2eid[tokens].to(torch.int32), "hash ids = tid2eid[token]")
    assert_exact(ids_ref, ids, "reference hash ids")
    torch.testing.assert_close(w, w_ref, rtol=4e-6, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(tid2eid=torch.zeros(5, 3, dtype=torch.int64)), "both tid2eid and token_ids"),
    (dict(tid2eid=torch.zeros(5, 2, dtype=torch.int64), token_ids=torch.zeros(4, dtype=torch.int64)), "top_k=3"),
    (dict(tid2eid=torch.zeros(5, 3, dtype=torch.int64), token_ids=torch.zeros(3, dtype=torch.int64)), "T=4"),
    (dict(scoring="relu"), "scoring 'relu'"),
])  # fmt: skip
def test_deepseek_route_rejects_bad_v4_args(bad, match):
    kw = dict(top_k=3, **SQRTSOFTPLUS) | bad
    with pytest.raises(ValueError, match=match):
        deepseek_route(torch.zeros(4, 8, device=DEV), **{k: v.to(DEV) if torch.is_tensor(v) else v
                                                           for k, v in kw.items()})


def _transformers_config(e: int, k: int, vocab: int):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(vocab_size=vocab, hidden_size=32, n_routed_experts=e, num_local_experts=e,
                            num_experts_per_tok=k, routed_scaling_factor=1.5, scoring_func="sqrtsoftplus")


@pytest.mark.skipif(DEV != "cpu", reason="transformers' router runs on CPU here")
def test_route_references_match_transformers_v4_routers():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HashRouter, DeepseekV4TopKRouter

    e, k, vocab, t = 16, 3, 40, 11
    cfg = _transformers_config(e, k, vocab)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, 32, generator=g)
    tokens = torch.randint(0, vocab, (t,), generator=g)
    top, hashed = DeepseekV4TopKRouter(cfg), DeepseekV4HashRouter(cfg)
    with torch.no_grad():
        for router in (top, hashed):
            router.weight.copy_(torch.randn(e, 32, generator=g))
        top.e_score_correction_bias.copy_(torch.randn(e, generator=g) * 0.5)
        hashed.tid2eid.copy_(torch.rand(vocab, e, generator=g).argsort(dim=1)[:, :k])
        logits, w_tf, ids_tf = top(x)
        w, ids = deepseek_route_ref(logits, top.e_score_correction_bias, top_k=k, routed_scaling_factor=1.5,
                                    **SQRTSOFTPLUS)
        order = ids_tf.sort(dim=1)  # transformers' topk is unsorted: compare as sets
        mine = ids.long().sort(dim=1)
        assert torch.equal(order.values, mine.values)
        torch.testing.assert_close(w.gather(1, mine.indices), w_tf.gather(1, order.indices), rtol=1e-6, atol=0)
        logits, w_tf, ids_tf = hashed(x, tokens)
        w, ids = deepseek_route_ref(logits, None, top_k=k, routed_scaling_factor=1.5, tid2eid=hashed.tid2eid,
                                    token_ids=tokens, **SQRTSOFTPLUS)
        assert torch.equal(ids.long(), ids_tf)
        torch.testing.assert_close(w, w_tf, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def v4_master():
    g = torch.Generator().manual_seed(7)
    w13 = torch.randn(E, 2 * 128, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, 128, generator=g) / 128**0.5
    return w13.to(DEV), w2.to(DEV)


def _v4_routing(t: int, seed: int):
    logits = torch.randn(t, E, generator=torch.Generator().manual_seed(seed)).to(DEV)
    return deepseek_route_ref(logits, top_k=TOPK, routed_scaling_factor=1.5, **SQRTSOFTPLUS)


@pytest.mark.parametrize("fmt", FMTS)
def test_fused_moe_swiglu_limit_matches_reference(fmt, v4_master):
    ew = quantize_experts(*v4_master, fmt)
    shared = quantize_experts(v4_master[0][:1], v4_master[1][:1], fmt)
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(8)).to(DEV, torch.bfloat16)
    w, ids = _v4_routing(13, seed=8)
    kw = stack_kwargs(ew) | dict(shared=shared, swiglu_limit=LIMIT)
    out = fused_moe(x, ew.w13, ew.w2, w, ids, **kw)
    ref = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **kw)
    assert_close_global(out, ref, MAX_DIFF[fmt], f"fused_moe {fmt=} swiglu_limit={LIMIT}")
    unclamped = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **(kw | dict(swiglu_limit=0.0)))
    assert not torch.equal(ref, unclamped), "the limit must clamp something at these shapes"


def test_fused_moe_nvfp4_input_scales_match_reference(v4_master):
    ew = quantize_experts(*v4_master, "nvfp4")
    g = torch.Generator().manual_seed(9)
    a13 = (torch.rand(E, generator=g) * 2e-3 + 5e-4).to(DEV)  # per expert, as a calibration writes them
    a2 = (torch.rand(E, generator=g) * 2e-4 + 5e-5).to(DEV)
    for t in (1, 13):
        x = torch.randn(t, H, generator=g).to(DEV, torch.bfloat16)
        w, ids = _v4_routing(t, seed=t)
        kw = stack_kwargs(ew) | dict(swiglu_limit=LIMIT, a13_scale=a13, a2_scale=a2)
        out = fused_moe(x, ew.w13, ew.w2, w, ids, **kw)
        ref = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **kw)
        assert_close_global(out, ref, MAX_DIFF["nvfp4"], f"fused_moe nvfp4 W4A4 T={t}")
    w4a16 = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **(kw | dict(a13_scale=None, a2_scale=None)))
    assert not torch.equal(ref, w4a16), "the input scales must quantize the activations"


def test_nvfp4_activation_scales_per_row_are_the_formats_per_tensor_quantizer():
    """The reference quantizes each slot's row with its expert's scale; it equals quantize_nvfp4 row by row."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 64, generator=g)
    gs = torch.rand(5, 1, generator=g) * 1e-3 + 1e-4
    rows = torch.cat([dequantize_nvfp4(*quantize_nvfp4(x[i : i + 1], gs[i]), dtype=torch.float32) for i in range(5)])
    assert_exact(dequantize_nvfp4(*quantize_nvfp4(x, gs), dtype=torch.float32), rows, "per-row global scales")


def test_fused_moe_rejects_bad_input_scales(v4_master):
    ew = quantize_experts(*v4_master, "nvfp4")
    x = torch.zeros(2, H, dtype=torch.bfloat16, device=DEV)
    w, ids = _v4_routing(2, seed=1)
    one = torch.ones(E, device=DEV)
    with pytest.raises(ValueError, match="a2_scale: expected float32"):
        fused_moe(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew), a13_scale=one)
    bf = ExpertWeights(*quantize_experts(*v4_master, "bf16")[:2])
    with pytest.raises(ValueError, match="experts are bf16"):
        fused_moe(x, bf.w13, bf.w2, w, ids, a13_scale=one, a2_scale=one)
