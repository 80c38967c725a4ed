"""The MLA references at any latent width (the runner's C + R, not only DeepSeek-V3's 512 + 64) and with the
runner's masks, against torch's scaled_dot_product_attention over the same keys; fp8_ds at other widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsquant.kernels.mla import (
    allocate_kv_cache,
    cache_store,
    cache_store_ref,
    dequantize_kv_tokens,
    kv_cache_bytes_per_token,
    mla_decode_ref,
    mla_prefill_ref,
    slot_mapping_for,
)
from dsquant.kernels.mla.reference import mla_attention_ref
from dsquant.kernels.testing import assert_exact, poison_

from dsquant.formats.fp8 import quantize_fp8_per_token_group

WIDTHS = [(128, 32), (256, 64), (512, 64)]
SCALE = 0.125


def _sdpa(q_nope, q_pe, kv_c, k_pe, allowed):
    """torch's attention with the absorbed layout spelled out: keys [kv_c | k_pe], values kv_c, one KV head.
    q [B, S, H, C] / [B, S, H, R], keys [B, T, C] / [B, T, R], allowed bool [B, S, T] -> [B, S, H, C]."""
    h = q_nope.shape[2]
    q = torch.cat([q_nope, q_pe], dim=-1).double().transpose(1, 2)  # [B, H, S, C + R]
    k = torch.cat([kv_c, k_pe], dim=-1).double()[:, None].expand(-1, h, -1, -1)  # [B, H, T, C + R]
    v = kv_c.double()[:, None].expand(-1, h, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=SCALE)
    return out.transpose(1, 2)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c,r", WIDTHS, ids=lambda w: str(w))
@pytest.mark.parametrize("sparse", [False, True], ids=["causal", "causal+keep"])
def test_mla_attention_ref_matches_sdpa(c, r, sparse):
    # A window of 5 queries at positions 4..8 over 9 keys (a prompt continued), optionally narrowed by a
    # per-query key mask as V3.2's indexer gives (each query keeps itself, so no row is empty).
    b, s, t, h, start = 2, 5, 9, 3, 4
    qn, qp = _randn(b, s, h, c, seed=0), _randn(b, s, h, r, seed=1)
    kv, pe = _randn(b, t, c, seed=2), _randn(b, t, r, seed=3)
    pos = torch.arange(start, start + s)
    allowed = (torch.arange(t)[None, :] <= pos[:, None])[None].expand(b, -1, -1)
    keep = None
    if sparse:
        keep = _randn(b, s, t, seed=4) > 0
        keep[:, torch.arange(s), pos] = True
        allowed = allowed & keep
    got = mla_attention_ref(qn, qp, kv, pe, SCALE, start_pos=start, keep=keep)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _sdpa(qn, qp, kv, pe, allowed), rtol=1e-5, atol=1e-5)


def test_mla_attention_ref_row_without_keys_is_zero():
    qn, qp = _randn(1, 3, 2, 128, seed=0), _randn(1, 3, 2, 32, seed=1)
    kv, pe = _randn(1, 3, 128, seed=2), _randn(1, 3, 32, seed=3)
    keep = torch.ones(1, 3, 3, dtype=torch.bool)
    keep[0, 1] = False
    out = mla_attention_ref(qn, qp, kv, pe, SCALE, keep=keep)
    assert bool((out[0, 1] == 0).all()) and bool(torch.isfinite(out).all())


def _paged(kind, c, r, lens, page_size=4, seed=0):
    """Tokens of each sequence stored in shuffled, NaN-poisoned pages -> (cache, block table, kv_scale,
    the dequantized tokens of each sequence [(kv_c [L, C], k_pe [L, R])])."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page_size) for n in lens]
    perm = torch.randperm(sum(pages) + 2, generator=g).to(torch.int32)
    bt = torch.full((len(lens), max(pages)), int(perm[-1]), dtype=torch.int32)  # spare pages past each length
    for i, (n, start) in enumerate(zip(pages, [sum(pages[:i]) for i in range(len(pages))])):
        bt[i, :n] = perm[start : start + n]
    cache = poison_(allocate_kv_cache(len(perm), page_size, kind, kv_lora_rank=c, rope_dim=r))
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    slots = slot_mapping_for(bt, pos, seq, page_size)
    kv_scale = torch.tensor(4.0 / 448) if kind == "fp8" else None
    cache_store_ref(_randn(len(pos), c, seed=5), _randn(len(pos), r, seed=6), cache, slots, kv_scale)
    kv, pe = dequantize_kv_tokens(cache, slots, kv_scale, kv_lora_rank=c, rope_dim=r)
    per_seq = [(kv[seq == i], pe[seq == i]) for i in range(len(lens))]
    return cache, bt, kv_scale, per_seq


@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8_ds"])
@pytest.mark.parametrize("c,r", WIDTHS[:2], ids=lambda w: str(w))
def test_cache_references_at_other_latent_widths(kind, c, r):
    # Sequence 0: prefix 6 + 5 new tokens; 1: no new token; 2: a fresh prompt of 7.
    lens, q_lens = [11, 3, 7], [5, 0, 7]
    cache, bt, kv_scale, per_seq = _paged(kind, c, r, lens)
    qsl = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    qn, qp = _randn(12, 2, c, seed=7), _randn(12, 2, r, seed=8)
    got = mla_prefill_ref(qn, qp, cache, bt, torch.tensor(lens, dtype=torch.int32), qsl, SCALE, kv_scale)
    for i, (n, q) in enumerate(zip(lens, q_lens)):
        if q == 0:
            continue
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        allowed = (torch.arange(n)[None, :] <= torch.arange(n - q, n)[:, None])[None]
        kv, pe = per_seq[i]
        want = _sdpa(qn[None, rows], qp[None, rows], kv[None], pe[None], allowed)[0]
        torch.testing.assert_close(got[rows].double(), want, rtol=1e-5, atol=1e-5)
    dec = mla_decode_ref(qn[:3], qp[:3], cache, bt, torch.tensor(lens, dtype=torch.int32), SCALE, kv_scale)
    for i in range(3):
        kv, pe = per_seq[i]
        want = _sdpa(qn[None, None, i], qp[None, None, i], kv[None], pe[None], torch.ones(1, 1, lens[i], dtype=bool))
        torch.testing.assert_close(dec[i].double(), want[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c,r,width", [(128, 32, 196), (256, 32, 328)], ids=["128+32", "256+32"])
def test_fp8_ds_layout_at_other_widths(c, r, width):
    # kv_c codes, then one float32 scale per 128 values, then k_pe in bf16: C + 4 * C / 128 + 2 * R bytes.
    assert kv_cache_bytes_per_token("fp8_ds", c, r) == width
    kv_c, k_pe = _randn(6, c, seed=0) * 3, _randn(6, r, seed=1)
    cache = poison_(allocate_kv_cache(2, 4, "fp8_ds", kv_lora_rank=c, rope_dim=r))
    slots = torch.tensor([7, 0, 3, 5, 1, 6])
    cache_store_ref(kv_c, k_pe, cache, slots)
    rows = cache.view(-1, width)[slots]
    q, scale = quantize_fp8_per_token_group(kv_c, 128)
    g = c // 128
    assert_exact(rows[:, :c].contiguous(), q.view(torch.uint8), "codes")
    assert_exact(rows[:, c : c + 4 * g].contiguous().view(torch.float32), scale, "group scales")
    assert_exact(rows[:, c + 4 * g :].contiguous().view(torch.bfloat16), k_pe.to(torch.bfloat16), "rope")


@pytest.mark.parametrize("c,r", [(100, 64), (64, 64), (128, 33)], ids=["C100", "C64", "R33"])
def test_fp8_ds_refuses_a_latent_without_its_layout(c, r):
    with pytest.raises(ValueError, match=rf"fp8_ds: a {c} \+ {r} latent has no fp8_ds layout.*use bf16 or fp8"):
        allocate_kv_cache(2, 4, "fp8_ds", kv_lora_rank=c, rope_dim=r)
    assert allocate_kv_cache(2, 4, "fp8", kv_lora_rank=c, rope_dim=r).shape == (2, 4, c + r)


def test_references_and_kernels_check_the_cache_against_the_latent():
    cache = allocate_kv_cache(2, 4, "bf16", kv_lora_rank=128, rope_dim=32)
    qn, qp = _randn(1, 2, 512, seed=0), _randn(1, 2, 64, seed=1)
    bt, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q_nope .*a bf16 cache of a 512 \+ 64 latent is .*576\], got \(2, 4, 160\)"):
        mla_decode_ref(qn, qp, cache, bt, lens, SCALE)
    with pytest.raises(ValueError, match=r"kv_cache: a bf16 cache of a 128 \+ 64 latent"):
        cache_store_ref(_randn(1, 128, seed=2), _randn(1, 64, seed=3), cache, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kv_cache: a bf16 cache of a 512 \+ 64 latent"):  # kernels: 512 + 64
        cache_store(_randn(1, 128, seed=2), _randn(1, 32, seed=3), cache, torch.zeros(1, dtype=torch.long))
