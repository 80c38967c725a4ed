"""Perplexity protocol arithmetic, checked against an independent scalar computation."""

from __future__ import annotations

import math

import pytest
import torch

from dsquant.runner.perplexity import Accumulator, kl_top1, make_windows, token_nll


def test_make_windows_non_overlapping_and_capped():
    ids = list(range(23))
    w = make_windows(ids, 5)
    assert w.tolist() == [ids[0:5], ids[5:10], ids[10:15], ids[15:20]]  # tail of 3 dropped
    assert make_windows(ids, 5, max_tokens=12).tolist() == [ids[0:5], ids[5:10]]


@pytest.mark.parametrize("seq_len,max_tokens", [(1, None), (30, None), (5, 4)])
def test_make_windows_errors(seq_len, max_tokens):
    with pytest.raises(ValueError, match="seq-len"):
        make_windows(list(range(23)), seq_len, max_tokens)


def _scalar_nll(logits, windows):
    """Plain-Python NLL over windows: position i predicts token i+1 (independent of the code under test)."""
    total, count = 0.0, 0
    for w in range(windows.shape[0]):
        for i in range(windows.shape[1] - 1):
            row = [float(v) for v in logits[w, i]]
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            total += lse - row[int(windows[w, i + 1])]
            count += 1
    return total, count


def test_accumulator_matches_scalar_computation():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 11, (3, 6), generator=g)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    base = logits + 0.5 * torch.randn(3, 6, 11, generator=g)
    acc = Accumulator()
    acc.add(logits[:2], windows[:2], base[:2])  # two batches: sums, then one division
    acc.add(logits[2:], windows[2:], base[2:])
    total, count = _scalar_nll(logits, windows)
    btotal, _ = _scalar_nll(base, windows)
    assert acc.tokens == count == 3 * 5
    assert acc.ppl == pytest.approx(math.exp(total / count), rel=1e-12)
    assert acc.base_ppl == pytest.approx(math.exp(btotal / count), rel=1e-12)
    cmp = acc.comparison()
    assert cmp["delta_ppl_pct"] == pytest.approx(100 * (acc.ppl - acc.base_ppl) / acc.base_ppl)
    # KL(base || quant) via torch's kl_div (input = log q, target = log p)
    lq = logits[:, :-1].double().log_softmax(-1)
    lp = base[:, :-1].double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum").item() / count
    assert cmp["kld"] == pytest.approx(kl, rel=1e-10)
    agree = (logits[:, :-1].argmax(-1) == base[:, :-1].argmax(-1)).float().mean().item()
    assert cmp["top1"] == pytest.approx(agree)


def test_identical_models_compare_as_identical():
    logits = torch.randn(2, 4, 7)
    kl, agree = kl_top1(logits, logits.clone())
    assert kl.abs().max().item() < 1e-12 and bool(agree.all())
    assert token_nll(logits, torch.zeros(2, 4, dtype=torch.long)).shape == (2, 3)
