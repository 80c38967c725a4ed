"""mla_decode / mla_prefill (Triton) against the float32 references, small shapes (CPU: TRITON_INTERPRET=1).

Thresholds (calc_diff against the float32 reference on the *same* dequantized cache):
    1e-5 for every cache dtype. The kernel rounds P to bf16 before P.V and the output to bf16
    (fp8 caches on float16 MMAs: q and P to float16, 2^-12 roundoff; the "dequant" tile also rounds
    each dequantized fp8_ds K value to bf16); a bf16 rounding has unit roundoff 2^-9, rms relative
    error ~1.1e-3, i.e. ~1e-6 of calc_diff apiece. Measured up to 2e-6 (fp8_ds dequant) at these
    shapes; a wrong page, split or merge gives >= 1e-2.
Quantization quality (fp8 caches against the bf16 cache of the same tokens): 1e-3, DeepGEMM's FP8
threshold; E4M3 rounding alone gives ~2e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dsquant.kernels.mla import (
    allocate_kv_cache,
    cache_store,
    mla_decode,
    mla_decode_ref,
    mla_prefill,
    mla_prefill_ref,
    slot_mapping_for,
)
from dsquant.kernels.mla.triton import AttendConfig, default_num_splits
from dsquant.kernels.testing import assert_close_global, calc_diff, poison_

DEV = "cuda" if torch.cuda.is_available() else "cpu"


KINDS = ["bf16", "fp8", "fp8_ds"]
MAX_DIFF = 1e-5
SCALE = 576**-0.5




def make_cache(kind, lens, page_size=16, extra_pages=3, seed=0):
    """A NaN-poisoned pool; each sequence's tokens stored through shuffled pages; unused block-table
    entries point at poisoned pages so a kernel reading past a length sees NaN."""
    g = torch.Generator().manual_seed(seed)
    n_used = [-(-n // page_size) for n in lens]
    max_pages = max(n_used) + 1
    num_pages = sum(n_used) + extra_pages
    perm = torch.randperm(num_pages, generator=g)
    bt = torch.empty(len(lens), max_pages, dtype=torch.int32)
    spare = perm[sum(n_used):]
    used = 0
    for b, n in enumerate(n_used):
        bt[b, :n] = perm[used : used + n]
        bt[b, n:] = spare[torch.randint(len(spare), (max_pages - n,), generator=g)]
        used += n
    bt = bt.to(DEV)
    cache = poison_(allocate_kv_cache(num_pages, page_size, kind, device=DEV))
    seq_ids = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)]).to(DEV)
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEV)
    kv_c = torch.randn(len(pos), 512, generator=g).to(DEV, torch.bfloat16)
    k_pe = torch.randn(len(pos), 64, generator=g).to(DEV, torch.bfloat16)
    kv_scale = torch.tensor(4.0 / 448, device=DEV) if kind == "fp8" else None
    cache_store(kv_c, k_pe, cache, slot_mapping_for(bt, pos, seq_ids, page_size), kv_scale=kv_scale)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return cache, bt, lens_t, kv_scale, (kv_c, k_pe, pos, seq_ids)


def _q(rows, heads, seed=1):
    g = torch.Generator().manual_seed(seed)
    qn = torch.randn(rows, heads, 512, generator=g).to(DEV, torch.bfloat16)
    qp = torch.randn(rows, heads, 64, generator=g).to(DEV, torch.bfloat16)
    return qn, qp


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["s1", "s3", "auto"])
@pytest.mark.parametrize("heads", [16, 5], ids=["H16", "H5"])
def test_mla_decode_matches_reference(kind, num_splits, heads):
    # Lengths: single token, a partial page, exact pages, the 64-token maximum.
    cache, bt, lens, kv_scale, _ = make_cache(kind, [1, 23, 32, 64, 47])
    qn, qp = _q(5, heads)
    got = mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, num_splits=num_splits)
    want = mla_decode_ref(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"decode {kind=} {num_splits=} {heads=}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tile", ["reload", "smem", "smem16", "dequant"])
def test_mla_decode_tile_schedules_match_reference(kind, tile):
    # How the fp8 tile reaches the two dots (read twice, or one converted shared tile) changes no number
    # (the interpreter runs "smem16" as "smem": its inline-PTX pin exists on the GPU only).
    cache, bt, lens, kv_scale, _ = make_cache(kind, [64, 23])
    qn, qp = _q(2, 16)
    cfg = AttendConfig(16, 32, 4, 2, tile)
    got = mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, num_splits=1, config=cfg)
    want = mla_decode_ref(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"decode {tile} {kind=}")
    if tile != "dequant":  # same float16 arithmetic as "regs", only the data path differs
        regs = mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, num_splits=1,
                          config=cfg._replace(tile="regs"))
        assert torch.equal(got, regs)


def test_mla_decode_padded_wgmma_head_block():
    # 32 heads run in a 64-row head block (the wgmma tile); the 32 padding rows must stay out.
    cache, bt, lens, kv_scale, _ = make_cache("fp8", [64, 9])
    qn, qp = _q(2, 32)
    got = mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale)
    want = mla_decode_ref(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, "decode H32")


def test_mla_decode_strided_queries_and_empty_rows():
    # q as produced by a [H, B, 512] bmm then transposed; a zero-length row gives zeros, more splits
    # than tiles leave empty splits that the merge must weigh 0.
    cache, bt, lens, kv_scale, _ = make_cache("fp8_ds", [40, 1, 17])
    lens[1] = 0
    qn = torch.randn(16, 3, 512, device=DEV).to(torch.bfloat16).transpose(0, 1)
    qp = torch.randn(16, 3, 64, device=DEV).to(torch.bfloat16).transpose(0, 1)
    got = mla_decode(qn, qp, cache, bt, lens, SCALE, num_splits=8, out_dtype=torch.float32)
    want = mla_decode_ref(qn, qp, cache, bt, lens, SCALE, out_dtype=torch.float32)
    assert bool((got[1] == 0).all())
    assert_close_global(got, want, MAX_DIFF, "decode strided q")


@pytest.mark.parametrize("kind", ["fp8", "fp8_ds"])
def test_mla_decode_fp8_cache_close_to_bf16_cache(kind):
    lens = [64, 30]
    bf16_cache, bt, lens_t, _, _ = make_cache("bf16", lens)
    cache, bt2, _, kv_scale, _ = make_cache(kind, lens)  # same seed: same tokens and pages
    assert torch.equal(bt, bt2)
    qn, qp = _q(2, 16)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    want = mla_decode_ref(qn, qp, bf16_cache, bt, lens_t, SCALE, out_dtype=torch.float32)
    assert_close_global(got, want, 1e-3, f"{kind} cache vs bf16 cache")


@pytest.mark.parametrize("kind", KINDS)
def test_mla_prefill_matches_reference(kind):
    # Sequence 0: prefix 20 + 12 new; 1: no new tokens; 2: fresh prompt of 33; 3: one new token.
    lens = [32, 16, 33, 64]
    q_lens = [12, 0, 33, 1]
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, lens)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=DEV)
    qn, qp = _q(sum(q_lens), 16)
    got = mla_prefill(qn, qp, cache, bt, lens_t, qsl, SCALE, kv_scale=kv_scale)
    want = mla_prefill_ref(qn, qp, cache, bt, lens_t, qsl, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"prefill {kind=}")
    # The last new token of each sequence attends like a decode step of that sequence.
    last = (qsl[1:] - 1)[torch.tensor(q_lens, device=DEV) > 0].long()
    seqs = torch.nonzero(torch.tensor(q_lens) > 0).flatten().to(DEV)
    dec = mla_decode(qn[last], qp[last], cache, bt[seqs], lens_t[seqs], SCALE, kv_scale=kv_scale)
    assert calc_diff(got[last], dec) < MAX_DIFF


def test_mla_prefill_is_causal():
    # Changing a later token's cache entry must not change earlier queries' outputs.
    cache, bt, lens, _, (kv_c, k_pe, pos, seq_ids) = make_cache("bf16", [24])
    qsl = torch.tensor([0, 24], dtype=torch.int32, device=DEV)
    qn, qp = _q(24, 16)
    before = mla_prefill(qn, qp, cache, bt, lens, qsl, SCALE)
    slots = slot_mapping_for(bt, pos, seq_ids, 16)
    cache_store(kv_c[-1:] * 100, k_pe[-1:] * 100, cache, slots[-1:])
    after = mla_prefill(qn, qp, cache, bt, lens, qsl, SCALE)
    assert torch.equal(before[:-1], after[:-1])
    assert not torch.equal(before[-1], after[-1])


def test_default_num_splits_follows_occupancy():
    # Few rows over a long context need splits to fill 132 SMs; thousands of rows need none.
    assert default_num_splits(1, 16, 32768, "bf16", 16, 132) >= 16
    assert default_num_splits(64, 16, 4096, "fp8", 16, 132) >= 2
    assert default_num_splits(4096, 128, 4096, "bf16", 64, 132) == 1
    assert default_num_splits(8, 16, 128, "bf16", 16, 132) == 1  # too short to split


def test_mla_attention_errors():
    cache, bt, lens, kv_scale, _ = make_cache("fp8", [8])
    qn, qp = _q(1, 16)
    with pytest.raises(ValueError, match="kv_scale"):
        mla_decode(qn, qp, cache, bt, lens, SCALE)
    with pytest.raises(ValueError, match="kv_scale"):
        mla_decode_ref(qn, qp, cache, bt, lens, SCALE)
    with pytest.raises(ValueError, match="q_nope"):
        mla_decode_ref(qn[..., :256], qp, cache, bt, lens, SCALE, kv_scale=kv_scale)
    with pytest.raises(ValueError, match="new tokens"):
        qsl = torch.tensor([0, 9], dtype=torch.int32, device=DEV)
        q9n, q9p = _q(9, 16)
        mla_prefill_ref(q9n, q9p, cache, bt, lens, qsl, SCALE, kv_scale=kv_scale)


# ---- GPU: DeepSeek-V3 shapes (kv_lora_rank 512, rope 64; h_q 16/64/128 = TP8 / Kimi-K2 / TP1), page 64.


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heads", [16, 128], ids=["H16", "H128"])
def test_mla_decode_v3_shapes_gpu(kind, heads):
    g = torch.Generator().manual_seed(heads)
    lens = torch.randint(1, 4097, (16,), generator=g).tolist()
    lens[0], lens[1] = 1, 4096
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, lens, page_size=64)
    qn, qp = _q(16, heads)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale)
    want = mla_decode_ref(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"decode {kind=} {heads=}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_mla_decode_long_context_gpu(kind):
    # >= 32K tokens: many splits per sequence and the LSE merge over them; a short row beside it.
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, [32768 + 77, 1500], page_size=64)
    qn, qp = _q(2, 64)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale)
    want = mla_decode_ref(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"decode 32K {kind=}")


@pytest.mark.gpu
def test_mla_decode_page16_gpu():
    cache, bt, lens_t, kv_scale, _ = make_cache("fp8_ds", [3000, 17, 1024, 2049], page_size=16)
    qn, qp = _q(4, 64)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE)
    want = mla_decode_ref(qn, qp, cache, bt, lens_t, SCALE, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, "decode page 16")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_mla_prefill_v3_shapes_gpu(kind):
    # Extend 256 tokens after a 1000-token prefix, plus a fresh 300-token prompt, 128 heads.
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, [1256, 300], page_size=64)
    qsl = torch.tensor([0, 256, 556], dtype=torch.int32, device=DEV)
    qn, qp = _q(556, 128)
    got = mla_prefill(qn, qp, cache, bt, lens_t, qsl, SCALE, kv_scale=kv_scale)
    want = mla_prefill_ref(qn, qp, cache, bt, lens_t, qsl, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"prefill {kind=}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "fp8_ds"])
@pytest.mark.parametrize("tile", ["regs", "reload", "smem", "smem16", "dequant"])
def test_mla_decode_tile_schedules_gpu(kind, tile):
    # Each way of feeding the fp8 tile to the two dots (bench_mla times them all) at V3 shapes.
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 4097, (8,), generator=g).tolist()
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, lens, page_size=64)
    qn, qp = _q(8, 16)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, config=AttendConfig(16, 32, 4, 3, tile))
    want = mla_decode_ref(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"decode {kind=} {tile=}")
