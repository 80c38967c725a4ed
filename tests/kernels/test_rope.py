"""RoPE from a cos/sin cache, in place on q's rope part and the latent k: Triton vs reference."""

from __future__ import annotations

import math

import pytest
import torch
from dsquant.kernels.rope.reference import apply_rope_ref, rope_cache_ref
from dsquant.kernels.rope.triton import apply_rope
from dsquant.kernels.testing import assert_exact

DEV = "cuda" if torch.cuda.is_available() else "cpu"
YARN = {"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096}


def _qk(t, h, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, 8 + r, generator=g).to(dtype).to(DEV)  # nope part first, as in MLA's q
    k = torch.randn(t, 16 + r, generator=g).to(dtype).to(DEV)  # latent kv then k_pe, as kv_a_proj's output
    return q, k


def _run(fn, q, k, r, cos, sin, pos):
    q, k = q.clone(), k.clone()
    fn(q[..., -r:], k[:, -r:], cos, sin, pos)  # strided views: the kernel works in place on them
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
def test_apply_rope_matches_reference(dtype, scaling):
    t, h, r = 9, 3, 16
    cos, sin = (c.to(DEV) for c in rope_cache_ref(r, 64, 10000.0, scaling))
    pos = torch.tensor([0, 1, 2, 5, 63, 7, 7, 30, 11], device=DEV)
    q, k = _qk(t, h, r, dtype)
    qa, ka = _run(apply_rope, q, k, r, cos, sin, pos)
    qe, ke = _run(apply_rope_ref, q, k, r, cos, sin, pos)
    assert_exact(qa[..., :-r], q[..., :-r], "q nope part untouched")
    assert_exact(ka[:, :-r], k[:, :-r], "latent part untouched")
    if DEV == "cpu":  # interpreter: the same float32 products and sums, bit for bit
        assert_exact(qa, qe, "q_pe")
        assert_exact(ka, ke, "k_pe")
    else:  # the GPU may fuse a product into an FMA: float32 rounding, below one bf16 ulp
        for a, e in ((qa, qe), (ka, ke)):
            assert (a.float() - e.float()).abs().max().item() <= 2.0**-7 * e.float().abs().max().item()


def test_rope_reference_is_a_rotation():
    """Independent check of the spec: pair norms are kept and position 0 is the identity."""
    r = 8
    cos, sin = rope_cache_ref(r, 16)
    q = torch.randn(4, 2, r, dtype=torch.float64).float()
    k = torch.randn(4, r)
    q0, k0 = q.clone(), k.clone()
    apply_rope_ref(q, k, cos, sin, torch.tensor([0, 3, 7, 15]))
    assert torch.equal(q[0], q0[0]) and torch.equal(k[0], k0[0])
    pair_norm = lambda x: x.view(*x.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(q), pair_norm(q0))
    angle = math.atan2(sin[3, 0].item(), cos[3, 0].item())
    assert abs(angle - 3.0) < 1e-5, "pair 0 turns by position x freq 1 rad"


@pytest.mark.gpu
def test_apply_rope_deepseek_shape_gpu():
    t, h, r = 4096, 128, 64
    cos, sin = (c.to(DEV) for c in rope_cache_ref(r, 8192, 10000.0, YARN))
    pos = torch.randint(0, 8192, (t,), device=DEV)
    q, k = _qk(t, h, r, torch.bfloat16)
    qa, ka = _run(apply_rope, q, k, r, cos, sin, pos)
    qe, ke = _run(apply_rope_ref, q, k, r, cos, sin, pos)
    for a, e in ((qa, qe), (ka, ke)):
        assert (a.float() - e.float()).abs().max().item() <= 2.0**-7 * e.float().abs().max().item()
