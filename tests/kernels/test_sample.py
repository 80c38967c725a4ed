"""Top-k / top-p sampling: the Triton kernel picks exactly the reference's token; the spec by hand."""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels.sample.reference import top_k_top_p_sample_ref
from dsquant.kernels.sample.triton import top_k_top_p_sample

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _args(k, p, u):
    return (torch.tensor(k, dtype=torch.int32, device=DEV), torch.tensor(p, dtype=torch.float32, device=DEV),
            torch.tensor(u, dtype=torch.float32, device=DEV))  # fmt: skip


def test_sample_reference_by_hand():
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]] * 7, device=DEV)
    # top-1; top-2 at u=0 and u=0.99; nucleus 0.5 and 0.7 ({0.4, 0.3}); 0.71 adds 0.2; no limit at u=0.05
    k, p, u = [1, 2, 2, 0, 0, 0, 0], [1, 1, 1, 0.5, 0.7, 0.71, 1], [0.9, 0, 0.99, 0.99, 0.99, 0.99, 0.05]
    expected = [1, 1, 2, 2, 2, 3, 0]
    assert top_k_top_p_sample_ref(probs, *_args(k, p, u)).tolist() == expected
    assert top_k_top_p_sample(probs, *_args(k, p, u)).tolist() == expected


def test_sample_ties_at_threshold_are_kept():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25]], device=DEV)
    # top-1 keeps all four tied entries (threshold form), so u=0.9 lands on id 3
    assert top_k_top_p_sample(probs, *_args([1], [1.0], [0.9])).item() == 3
    assert top_k_top_p_sample_ref(probs, *_args([1], [1.0], [0.9])).item() == 3


@pytest.mark.parametrize("v", [37, 300], ids=lambda v: f"V{v}")
def test_sample_matches_reference_random(v):
    g = torch.Generator().manual_seed(v)
    b = 16
    probs = torch.softmax(torch.randn(b, v, generator=g) * 3, dim=-1)
    probs[0, :5] = 0.0  # zero-probability tokens are never picked
    k = torch.randint(0, v + 3, (b,), generator=g).tolist()
    p = torch.rand(b, generator=g).clamp(0.05, 1.0).tolist()
    u = torch.rand(b, generator=g).tolist()
    probs = probs.to(DEV)
    got = top_k_top_p_sample(probs, *_args(k, p, u))
    want = top_k_top_p_sample_ref(probs, *_args(k, p, u))
    assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"
    assert (probs.gather(1, got[:, None]) > 0).all()


@pytest.mark.gpu
def test_sample_matches_reference_deepseek_vocab_gpu():
    g = torch.Generator().manual_seed(0)
    b, v = 8, 129280
    probs = torch.softmax(torch.randn(b, v, generator=g) * 4, dim=-1).to(DEV)
    k, p = [0, 1, 50, 0, 20, 0, 1000, 5], [1.0, 1.0, 0.9, 0.95, 0.5, 0.3, 0.99, 1.0]
    u = torch.rand(b, generator=g).tolist()
    assert torch.equal(top_k_top_p_sample(probs, *_args(k, p, u)), top_k_top_p_sample_ref(probs, *_args(k, p, u)))
