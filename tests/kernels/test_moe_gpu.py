"""MoE kernels at DeepSeek-V3 shapes on a GPU (H=7168, I=2048, E=256, top-8 from 4 of 8 groups; Kimi-K2 E=384)."""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels.moe import (
    deepseek_route,
    deepseek_route_ref,
    fused_moe,
    fused_moe_ref,
    moe_align,
    moe_align_ref,
)
from dsquant.kernels.moe.reference import quantize_experts
from dsquant.kernels.testing import DEEPSEEK_V3_MOE, assert_close_global, assert_exact

from tests.kernels.test_moe_kernels import FMTS, MAX_DIFF, ROUTERS, poisoning

pytestmark = pytest.mark.gpu
H, INTER, E, TOPK = (DEEPSEEK_V3_MOE[k] for k in ("hidden", "inter", "experts", "topk"))
TOKENS = [1, 16, 64, 512, 4096]


def _route(t: int, e: int, name: str, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(t, e, device="cuda", generator=g)
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    return logits, bias, ROUTERS[name][1]


@pytest.mark.parametrize("name", ["v3", "kimi_k2", "v2"])
def test_deepseek_route_at_scale(name):
    e = ROUTERS[name][0]
    logits, bias, kw = _route(4096, e, name, seed=1)
    grid = (logits * 8).round() / 8  # on a grid: ties exact in both, no float race between distinct scores
    w, ids = deepseek_route(grid, bias.round(decimals=2) if name != "v2" else None, **kw)
    w_ref, ids_ref = deepseek_route_ref(grid, bias.round(decimals=2) if name != "v2" else None, **kw)
    assert_exact(ids, ids_ref, f"{name} ids")
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=0)
    # Continuous logits: CUDA's exp and torch's may differ by an ulp, so a token may swap two experts whose
    # selection scores are within float32 rounding; allow exactly that and nothing else.
    w, ids = deepseek_route(logits, bias, **kw)
    w_ref, ids_ref = deepseek_route_ref(logits, bias, **kw)
    bad = (ids.sort(1).values != ids_ref.sort(1).values).any(1)
    sel = torch.sigmoid(logits) + bias if kw.get("scoring", "sigmoid") == "sigmoid" else torch.softmax(logits, -1)
    gap = (sel.gather(1, ids.long()).sort(1).values - sel.gather(1, ids_ref.long()).sort(1).values).abs().amax(1)
    assert bool((gap[bad] < 1e-5).all()), f"{name}: {int(bad.sum())} tokens differ beyond a near-tie"


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("t", TOKENS + [16384])
@pytest.mark.parametrize("e", [256, 384])
def test_moe_align_at_scale(e, t, block_m):
    g = torch.Generator(device="cuda").manual_seed(t)
    ids = torch.rand(t, e, device="cuda", generator=g).topk(TOPK, dim=1).indices.to(torch.int32)
    pairs = zip(moe_align(ids, e, block_m), moe_align_ref(ids, e, block_m), ("sorted", "experts", "total"))
    for got, want, what in pairs:
        assert_exact(got, want, f"{what} E={e} T={t} block_m={block_m}")


@pytest.fixture(scope="module")
def master():
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, device="cuda", dtype=torch.bfloat16, generator=g) * H**-0.5
    w2 = torch.randn(E, H, INTER, device="cuda", dtype=torch.bfloat16, generator=g) * INTER**-0.5
    return w13, w2


@pytest.fixture(scope="module", params=FMTS)
def experts(request, master):
    ew = quantize_experts(*master, request.param)
    yield ew
    del ew
    torch.cuda.empty_cache()


def _kw(ew):
    return dict(fmt=ew.fmt, w13_scale=ew.w13_scale, w2_scale=ew.w2_scale, w13_global_scale=ew.w13_global_scale,
                w2_global_scale=ew.w2_global_scale)


def _inputs(t: int, seed: int):
    logits, bias, kw = _route(t, E, "v3", seed)
    w, ids = deepseek_route(logits, bias, **kw)
    x = torch.randn(t, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)).bfloat16()
    return x, w, ids


@pytest.mark.parametrize("t", TOKENS)
def test_fused_moe_v3(experts, t):
    x, w, ids = _inputs(t, seed=t)
    out = fused_moe(x, experts.w13, experts.w2, w, ids, **_kw(experts))
    ref = fused_moe_ref(x, experts.w13, experts.w2, w, ids, **_kw(experts))
    assert_close_global(out, ref, MAX_DIFF[experts.fmt], f"fused_moe V3 fmt={experts.fmt} T={t}")


def test_fused_moe_v3_graph_and_poison(experts, monkeypatch):
    """fp8 and nvfp4, T=16: routing + alignment + experts replay from a CUDA graph (no host sync), and every buffer the
    kernels allocate starting as NaN changes nothing."""
    if experts.fmt not in ("fp8", "nvfp4"):
        pytest.skip("one 8-bit and one 4-bit format suffice")
    x, w, ids = _inputs(16, seed=3)
    logits, bias, kw = _route(16, E, "v3", seed=3)
    eager = fused_moe(x, experts.w13, experts.w2, *deepseek_route(logits, bias, **kw), **_kw(experts))
    graph = torch.cuda.CUDAGraph()
    static_logits = logits.clone()
    fused_moe(x, experts.w13, experts.w2, *deepseek_route(static_logits, bias, **kw), **_kw(experts))  # warm-up
    with torch.cuda.graph(graph):
        static_out = fused_moe(x, experts.w13, experts.w2, *deepseek_route(static_logits, bias, **kw), **_kw(experts))
    static_logits.copy_(torch.randn_like(logits))
    graph.replay()
    static_logits.copy_(logits)
    graph.replay()
    assert_exact(static_out, eager, "graph replay")

    monkeypatch.setattr(torch, "empty", poisoning(torch.empty))
    poisoned = fused_moe(x, experts.w13, experts.w2, *deepseek_route(logits, bias, **kw), **_kw(experts))
    monkeypatch.undo()
    assert_exact(poisoned, eager, "NaN-poisoned workspaces")
