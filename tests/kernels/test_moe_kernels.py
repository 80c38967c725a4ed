"""MoE kernels vs their references on CPU (TRITON_INTERPRET=1, small shapes) or GPU: routing, alignment, fused MLPs."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.moe import (
    ExpertWeights,
    deepseek_route,
    deepseek_route_ref,
    fused_moe,
    fused_moe_ref,
    moe_align,
    moe_align_ref,
)
from dsquant.kernels.moe.fused import fp4_tiles
from dsquant.kernels.moe.reference import quantize_experts
from dsquant.kernels.testing import assert_close_global, assert_exact, poison_

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# Router configs of the checkpoints served: (E, kwargs).
ROUTERS = {
    "v3": (256, dict(n_group=8, topk_group=4, top_k=8, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "kimi_k2": (384, dict(n_group=1, topk_group=1, top_k=8, routed_scaling_factor=2.827, norm_topk_prob=True)),
    "v2_lite": (64, dict(top_k=6, routed_scaling_factor=1.0, norm_topk_prob=False, scoring="softmax",
                         method="greedy")),
    "v2": (160, dict(n_group=8, topk_group=3, top_k=6, routed_scaling_factor=16.0, norm_topk_prob=False,
                     scoring="softmax", method="group_limited_greedy")),
    "sigmoid_no_bias": (64, dict(n_group=4, topk_group=2, top_k=4, routed_scaling_factor=1.0)),
}


def grid_logits(t: int, e: int, seed: int) -> torch.Tensor:
    """Logits on a 1/4 grid: many exact ties (lowest index must win), distinct scores far apart (no ulp races)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-12, 13, (t, e), generator=g).float() / 4).to(DEV)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_deepseek_route_matches_reference(name):
    e, kw = ROUTERS[name]
    logits = grid_logits(16, e, seed=len(name))
    bias = None
    if name != "sigmoid_no_bias":
        bias = (torch.randint(-4, 5, (e,), generator=torch.Generator().manual_seed(1)).float() / 16).to(DEV)
    w, ids = deepseek_route(logits, bias, **kw)
    w_ref, ids_ref = deepseek_route_ref(logits, bias, **kw)
    assert_exact(ids, ids_ref, f"{name} topk_ids")
    # sigmoid/softmax and the 8-term sum round differently in numpy/CUDA and torch: a few ulp of float32.
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=0, msg=lambda m: f"{name} weights: {m}")


@pytest.mark.parametrize("name", ["v3", "kimi_k2"])
def test_deepseek_route_ties_go_to_lowest_index(name):
    e, kw = ROUTERS[name]
    w, ids = deepseek_route(torch.zeros(3, e, device=DEV), torch.zeros(e, device=DEV), **kw)
    # All scores equal: the first groups, then the first experts, in index order; weights renormalised evenly.
    assert ids.tolist() == [list(range(8))] * 3
    torch.testing.assert_close(w.cpu(), torch.full((3, 8), kw["routed_scaling_factor"] / 8))


def test_deepseek_route_group_limit_beats_global_top_k():
    # 4 groups of 2. Group 0 holds the best expert (logit 5) but its top-2 sum sigmoid(5) + sigmoid(-5) = 1.0 loses
    # to group 1 (2 sigmoid(1) = 1.46) and group 2 (2 sigmoid(0.9) = 1.42); top-2 of those = experts 2 and 3.
    logits = torch.tensor([[5.0, -5.0, 1.0, 1.0, 0.9, 0.9, -5.0, -5.0]], device=DEV)
    w, ids = deepseek_route(logits, torch.zeros(8, device=DEV), n_group=4, topk_group=2, top_k=2,
                            routed_scaling_factor=2.0)
    assert ids.tolist() == [[2, 3]]
    torch.testing.assert_close(w.cpu(), torch.tensor([[1.0, 1.0]]))


@pytest.mark.parametrize("bad, match", [
    (dict(scoring="tanh"), "scoring"),
    (dict(method="topk"), "method"),
    (dict(n_group=3), "n_group=3"),
    (dict(n_group=8, topk_group=9), "topk_group=9"),
    (dict(top_k=17, n_group=4, topk_group=1), "top_k=17"),
])
def test_deepseek_route_rejects_bad_config(bad, match):
    kw = dict(n_group=4, topk_group=2, top_k=4) | bad
    with pytest.raises(ValueError, match=match):
        deepseek_route(torch.zeros(2, 64, device=DEV), None, **kw)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        deepseek_route(torch.zeros(2, 64, device=DEV), torch.zeros(63, device=DEV))
    with pytest.raises(ValueError, match="router logits"):
        deepseek_route(torch.zeros(64, device=DEV))


def _ids(t, e, k, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # most slots on expert 3: runs spanning several chunks
        ids = torch.where(torch.rand(t, k, generator=g) < 0.8, 3, torch.randint(0, e, (t, k), generator=g))
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    return ids.to(torch.int32).to(DEV)


# (T, E, k, block_m, skew). Up to 512 slots one program aligns (50 x 8 skewed: runs across its 128-slot chunks);
# 1800 slots take the three-kernel path, 1100 x 8 slots its scan over more than 64 chunks.
ALIGN_CASES = [(1, 8, 2, 16, False), (16, 8, 2, 4, False), (7, 256, 8, 16, False), (300, 64, 6, 16, False),
               (300, 64, 6, 64, True), (5, 384, 8, 16, False), (1100, 256, 8, 64, False), (50, 64, 8, 16, True),
               (64, 256, 8, 64, False)]


@pytest.mark.parametrize("t, e, k, block_m, skew", ALIGN_CASES, ids=lambda v: str(v))
def test_moe_align_matches_reference(t, e, k, block_m, skew):
    ids = _ids(t, e, k, seed=t + e, skew=skew)
    for got, want, what in zip(moe_align(ids, e, block_m), moe_align_ref(ids, e, block_m),
                               ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")):
        assert_exact(got, want, f"{what} T={t} E={e} k={k} block_m={block_m}")


@pytest.mark.parametrize("t, e, k, block_m, skew", ALIGN_CASES[2:5], ids=lambda v: str(v))
def test_moe_align_invariants(t, e, k, block_m, skew):
    """Checked from the definition, independent of the reference."""
    ids = _ids(t, e, k, seed=7, skew=skew)
    sorted_ids, expert_ids, total = (v.cpu() for v in moe_align(ids, e, block_m))
    flat = ids.cpu().flatten().tolist()
    n = len(flat)
    used = int(total)
    counts = [flat.count(x) for x in range(e)]
    assert used == sum(-(-c // block_m) * block_m for c in counts)
    real = [s for s in sorted_ids[:used].tolist() if s != n]
    assert sorted(real) == list(range(n)), "every slot exactly once"
    assert set(sorted_ids[used:].tolist()) <= {n}, "only the sentinel past the end"
    for b in range(expert_ids.numel()):
        rows = [s for s in sorted_ids[b * block_m:(b + 1) * block_m].tolist() if s != n]
        if b * block_m >= used:
            assert int(expert_ids[b]) == -1
            continue
        assert all(flat[s] == int(expert_ids[b]) for s in rows), f"block {b} mixes experts"
        assert rows == sorted(rows), f"block {b}: slots not ascending"


# Tiny experts: E=8, H=256, I=128 (one 128 block each way), top-2.
E, H, INTER, TOPK = 8, 256, 128, 2
FMTS = ["bf16", "fp8", "int8", "nvfp4", "mxfp4"]
# calc_diff thresholds. Kernel and reference quantize with the same numerics; they differ by fp32 accumulation order,
# the bf16 rounding of each weighted slot output before the k-way sum (~2^-9 relative: ~4e-6 measured at T=5 on
# every format), and for fp8/int8 the odd activation code that flips when the bf16 intermediate rounds the other
# way (one fp8 ulp = 2^-3 relative on that element).
MAX_DIFF = {"bf16": 2e-5, "nvfp4": 2e-5, "mxfp4": 2e-5, "fp8": 5e-5, "int8": 5e-5}


@pytest.fixture(scope="module")
def master_weights():
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, INTER, generator=g) / INTER**0.5
    return w13.to(DEV), w2.to(DEV)


def poisoning(empty):
    """A torch.empty whose buffers start as NaN (2+ byte floats) or 0x7F bytes (fp8 NaN, large ints)."""

    def poisoned_empty(*args, **kwargs):
        buf = empty(*args, **kwargs)
        if buf.is_floating_point() and buf.element_size() >= 2:
            return poison_(buf)
        buf.view(torch.uint8).fill_(0x7F)  # poison_ itself fails on these ("and t" of a multi-element tensor)
        return buf

    return poisoned_empty


def stack_kwargs(ew: ExpertWeights) -> dict:
    return dict(fmt=ew.fmt, w13_scale=ew.w13_scale, w2_scale=ew.w2_scale, w13_global_scale=ew.w13_global_scale,
                w2_global_scale=ew.w2_global_scale)


def _routing(t, seed):
    logits = torch.randn(t, E, generator=torch.Generator().manual_seed(seed)).to(DEV)
    return deepseek_route_ref(logits, top_k=TOPK, routed_scaling_factor=2.5)


@pytest.mark.parametrize("t", [1, 13])
@pytest.mark.parametrize("fmt", FMTS)
def test_fused_moe_matches_reference(fmt, t, master_weights):
    ew = quantize_experts(*master_weights, fmt)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(t)).to(DEV, torch.bfloat16)
    w, ids = _routing(t, seed=t)
    out = fused_moe(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    ref = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    assert out.dtype == torch.bfloat16
    assert_close_global(out, ref, MAX_DIFF[fmt], f"fused_moe {fmt=} T={t} E={E} H={H} I={INTER}")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fused_moe_fp4_prefill_tiles_match_reference(fmt, master_weights):
    """FP4 prefill tiles interleave the decoded nibbles into one tile and one dot (decode tiles make two parity
    dots): both must meet the reference threshold."""
    ew = quantize_experts(*master_weights, fmt)
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(5)).to(DEV, torch.bfloat16)
    w, ids = _routing(13, seed=5)
    out = fused_moe(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew), tiles=dict(prequant=True, BLOCK_M=32))
    ref = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    assert_close_global(out, ref, MAX_DIFF[fmt], f"fused_moe {fmt=} prefill tiles")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fused_moe_padding_never_leaks_nan(fmt, master_weights, monkeypatch):
    """Every buffer the kernels allocate starts as NaN/0x7F and x's storage holds NaN after the T real rows (the row
    a sentinel slot would name): the output must still equal the reference, so only real rows were read."""
    ew = quantize_experts(*master_weights, fmt)
    t = 3
    buf = torch.full((t + 2, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    buf[:t] = torch.randn(t, H, generator=torch.Generator().manual_seed(5)).to(DEV, torch.bfloat16)
    x = buf[:t]
    w, ids = _routing(t, seed=11)
    ref = fused_moe_ref(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    monkeypatch.setattr(torch, "empty", poisoning(torch.empty))
    out = fused_moe(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    monkeypatch.undo()
    assert not torch.isnan(out).any()
    assert_close_global(out, ref, MAX_DIFF[fmt], f"poisoned {fmt=}")


def test_fused_moe_shared_expert_in_another_format(master_weights):
    routed = quantize_experts(*master_weights, "mxfp4")
    w13, w2 = master_weights
    shared = ExpertWeights(w13[5].to(torch.bfloat16), w2[5].to(torch.bfloat16))  # 2-D: one expert, bf16
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    w, ids = _routing(6, seed=3)
    out = fused_moe(x, routed.w13, routed.w2, w, ids, **stack_kwargs(routed), shared=shared)
    ref = fused_moe_ref(x, routed.w13, routed.w2, w, ids, **stack_kwargs(routed), shared=shared)
    without = fused_moe_ref(x, routed.w13, routed.w2, w, ids, **stack_kwargs(routed))
    assert_close_global(out, ref, MAX_DIFF["mxfp4"], "routed mxfp4 + shared bf16")
    assert not torch.equal(ref, without), "the shared expert must contribute"


def test_fused_moe_and_routing_take_zero_tokens(master_weights):
    ew = quantize_experts(*master_weights, "fp8")
    w, ids = deepseek_route(torch.zeros(0, E, device=DEV), None, top_k=TOPK)
    assert w.shape == ids.shape == (0, TOPK)
    out = fused_moe(torch.zeros(0, H, dtype=torch.bfloat16, device=DEV), ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    assert out.shape == (0, H) and out.dtype == torch.bfloat16


def test_fused_moe_rejects_bad_inputs(master_weights):
    ew = quantize_experts(*master_weights, "fp8")
    x = torch.zeros(2, H, dtype=torch.bfloat16, device=DEV)
    w, ids = _routing(2, seed=0)
    kw = stack_kwargs(ew)
    with pytest.raises(ValueError, match="hidden states: expected bf16"):
        fused_moe(x.float(), ew.w13, ew.w2, w, ids, **kw)
    with pytest.raises(ValueError, match="multiple of 128"):
        fused_moe(torch.zeros(2, 200, dtype=torch.bfloat16, device=DEV), ew.w13, ew.w2, w, ids, **kw)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, ew.w13, ew.w2, w[:1], ids[:1], **kw)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe(x, ew.w13, ew.w2, w, ids, **(kw | dict(w13_scale=ew.w13_scale[:, :1])))
    with pytest.raises(ValueError, match="experts.w2: expected"):
        fused_moe(x, ew.w13, ew.w2.to(torch.bfloat16), w, ids, **kw)
    with pytest.raises(ValueError, match="unknown expert format"):
        fused_moe(x, ew.w13, ew.w2, w, ids, **(kw | dict(fmt="int4")))
    nv = quantize_experts(*master_weights, "nvfp4")
    with pytest.raises(ValueError, match="w2_global_scale"):
        fused_moe(x, nv.w13, nv.w2, w, ids, **(stack_kwargs(nv) | dict(w2_global_scale=None)))


def test_fused_moe_fp8_prequantized_rows_give_the_same_bits(master_weights):
    """x quantized up front (prefill tiles) or inside the gate_up kernel (decode tiles): same codes, same output;
    small GROUP_M and BLOCK_M = 32 also walk the grouped program order over a ragged last group."""
    ew = quantize_experts(*master_weights, "fp8")
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(9)).to(DEV, torch.bfloat16)
    w, ids = _routing(9, seed=9)
    outs = [fused_moe(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew), tiles=dict(prequant=p, BLOCK_M=32, GROUP_M=3))
            for p in (False, True)]
    assert_exact(outs[1], outs[0], "prequant vs in-kernel quant")


def test_fused_moe_kimi_k2_expert_count():
    """E = 384 (Kimi-K2), top-8: expert ids above 255 route to the right weights."""
    e, t = 384, 4
    g = torch.Generator().manual_seed(4)
    ew = quantize_experts(torch.randn(e, 2 * INTER, H, generator=g) / H**0.5,
                          torch.randn(e, H, INTER, generator=g) / INTER**0.5, "fp8")
    ew = ExpertWeights(*(v.to(DEV) if isinstance(v, torch.Tensor) else v for v in ew))
    x = torch.randn(t, H, generator=g).to(DEV, torch.bfloat16)
    w, ids = deepseek_route_ref(torch.randn(t, e, generator=g).to(DEV), top_k=8, routed_scaling_factor=2.827)
    assert int(ids.max()) > 255
    out = fused_moe(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew))
    assert_close_global(out, fused_moe_ref(x, ew.w13, ew.w2, w, ids, **stack_kwargs(ew)), MAX_DIFF["fp8"], "E=384")


@pytest.mark.parametrize("fmt", FMTS)
def test_stack_experts_matches_whole_stack_quantization(fmt, master_weights):
    """Per-expert gate/up/down linears, quantized one by one as a checkpoint stores them, stack into the same bytes
    as quantizing each expert's [2I, H] at once (NVFP4: gate and up given their shared global scale)."""
    from dsquant.kernels.moe import stack_experts

    from dsquant.formats import quantize_fp8_block, quantize_int8_per_channel, quantize_mxfp4, quantize_nvfp4
    from dsquant.formats.nvfp4 import nvfp4_global_scale

    w13, w2 = (w[:3] for w in master_weights)
    whole = quantize_experts(w13, w2, fmt)

    def quant(w, gs=None):
        if fmt == "bf16":
            return w.to(torch.bfloat16), None, None
        if fmt == "nvfp4":
            return quantize_nvfp4(w, gs)
        q = {"fp8": quantize_fp8_block, "int8": quantize_int8_per_channel, "mxfp4": quantize_mxfp4}[fmt](w)
        return q[0], q[1], None

    parts = {"gate": [], "up": [], "down": []}
    for e in range(3):
        gs = nvfp4_global_scale(w13[e].abs().amax()) if fmt == "nvfp4" else None
        parts["gate"].append(quant(w13[e, :INTER], gs))
        parts["up"].append(quant(w13[e, INTER:], gs))
        parts["down"].append(quant(w2[e]))
    stacked = stack_experts(fmt, parts["gate"], parts["up"], parts["down"])
    assert stacked.fmt == fmt
    for name in ("w13", "w2", "w13_scale", "w2_scale", "w13_global_scale", "w2_global_scale"):
        got, want = getattr(stacked, name), getattr(whole, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert_exact(got, want, f"{fmt} {name}")
    if fmt == "nvfp4":
        bad = [(q, s, g * 2) for q, s, g in parts["up"]]
        with pytest.raises(ValueError, match="global scales differ"):
            stack_experts(fmt, parts["gate"], bad, parts["down"])
    with pytest.raises(ValueError, match="down projections"):
        stack_experts(fmt, parts["gate"], parts["up"], parts["down"][:2])


def test_deepseek_route_single_expert_is_not_renormalised():
    # HF MoEGate renormalises only when top_k > 1: with top_k = 1 the weight stays the score times the scale.
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]], device=DEV)
    w, ids = deepseek_route(logits, None, top_k=1, routed_scaling_factor=2.0, norm_topk_prob=True)
    assert ids.tolist() == [[1]]
    torch.testing.assert_close(w.cpu(), 2.0 * torch.sigmoid(torch.tensor([[2.0]])))


@triton.jit
def _fp4_decode_probe(w_ptr, s_ptr, even_ptr, odd_ptr, FMT: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rows = tl.arange(0, N)
    scale_group: tl.constexpr = 16 if FMT == format_codes.NVFP4 else 32
    even, odd = fp4_tiles(w_ptr, s_ptr, rows * (K // 2), rows * (K // scale_group), 0, FMT, N, K)
    offs = tl.arange(0, K // 2)[:, None] * N + rows[None, :]
    tl.store(even_ptr + offs, tl.trans(even))
    tl.store(odd_ptr + offs, tl.trans(odd))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_decode_is_exact(fmt):
    """The in-register E2M1 decode against dsquant.formats, bit for bit: every code, subnormal and extreme scales."""
    from dsquant.formats import dequantize_mxfp4, dequantize_nvfp4

    n, k = 16, 64
    g = torch.Generator().manual_seed(2)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    packed[0, :8] = torch.arange(0, 256, 32, dtype=torch.uint8) + torch.arange(8, dtype=torch.uint8)  # all nibbles
    if fmt == "nvfp4":  # E4M3 bytes 0x01..0x7E: subnormal to 448 (NaN 0x7F excluded)
        scale = torch.randint(1, 0x7F, (n, k // 16), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
        want = dequantize_nvfp4(packed, scale, torch.tensor(1.0), dtype=torch.bfloat16)
    else:  # E8M0 bytes 0 (2^-127) to 250 (2^123)
        scale = torch.randint(0, 251, (n, k // 32), dtype=torch.uint8, generator=g)
        scale[0, 0], scale[1, 1] = 0, 250
        want = dequantize_mxfp4(packed, scale, dtype=torch.bfloat16)
    even = torch.empty(k // 2, n, dtype=torch.bfloat16)
    odd = torch.empty(k // 2, n, dtype=torch.bfloat16)
    args = [t.to(DEV) for t in (packed, scale, even, odd)]
    _fp4_decode_probe[(1,)](*args, FMT=format_codes.MOE_FORMATS[fmt], N=n, K=k)
    got = torch.empty(n, k, dtype=torch.bfloat16)
    got[:, 0::2], got[:, 1::2] = args[2].cpu().t(), args[3].cpu().t()
    assert_exact(got, want, f"{fmt} decoded weights")
