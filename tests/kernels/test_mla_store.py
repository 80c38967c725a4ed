"""cache_store (Triton) writes the documented byte layouts, bit-identical to dsquant.formats.fp8 quantization."""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels.mla import (
    allocate_kv_cache,
    cache_store,
    cache_store_ref,
    dequantize_kv_tokens,
    kv_cache_bytes_per_token,
    kv_cache_dtype,
)
from dsquant.kernels.testing import assert_exact, calc_diff, poison_

from dsquant.formats.fp8 import quantize_fp8_per_tensor, quantize_fp8_per_token_group

DEV = "cuda" if torch.cuda.is_available() else "cpu"




def _tokens(t: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv_c = (torch.randn(t, 512, generator=g) * torch.logspace(-2, 1, t)[:, None]).to(dtype)  # varied amax
    k_pe = torch.randn(t, 64, generator=g).to(dtype)
    return kv_c.to(DEV), k_pe.to(DEV)


def _slots(t: int, pages: int, page_size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(pages * page_size, generator=g)[:t].to(DEV)


@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8_ds"])
@pytest.mark.parametrize("ue8m0", [False, True], ids=["scale", "ue8m0"])
def test_cache_store_matches_reference(kind, ue8m0):
    if ue8m0 and kind != "fp8_ds":
        pytest.skip("ue8m0 applies to fp8_ds group scales only")
    kv_c, k_pe = _tokens(37)
    slots = _slots(37, pages=4, page_size=16)
    kv_scale = torch.tensor(0.0123, device=DEV) if kind == "fp8" else None
    got = poison_(allocate_kv_cache(4, 16, kind, device=DEV))
    want = poison_(allocate_kv_cache(4, 16, kind, device=DEV))
    cache_store(kv_c, k_pe, got, slots, kv_scale=kv_scale, ue8m0=ue8m0)
    cache_store_ref(kv_c, k_pe, want, slots, kv_scale=kv_scale, ue8m0=ue8m0)
    assert_exact(got.view(torch.uint8), want.view(torch.uint8), f"{kind} ue8m0={ue8m0}")


def test_cache_store_fp8_per_tensor_codes_match_formats():
    # The per-tensor scale a calibration would pick over these tokens; codes must be formats' codes.
    kv_c, k_pe = _tokens(20)
    x = torch.cat([kv_c, k_pe], dim=-1)
    q, scale = quantize_fp8_per_tensor(x)
    cache = allocate_kv_cache(2, 16, "fp8", device=DEV)
    slots = _slots(20, pages=2, page_size=16).to(torch.int32)  # int32 slots, as vLLM passes them
    cache_store(kv_c, k_pe, cache, slots, kv_scale=scale)
    assert_exact(cache.view(-1, 576)[slots.long()], q, "fp8 per-tensor codes")


@pytest.mark.parametrize("ue8m0", [False, True], ids=["scale", "ue8m0"])
def test_cache_store_fp8_ds_layout_matches_formats(ue8m0):
    # Read the raw 656-byte rows at the documented offsets, independently of cache.py's helpers.
    kv_c, k_pe = _tokens(24, dtype=torch.float32)
    kv_c[3] = 0.0  # all-zero token: floor scale 1e-4 / 448 and zero codes
    kv_c[5, :128] *= 1e6  # one huge group: its scale only, other groups unaffected
    q, scale = quantize_fp8_per_token_group(kv_c, 128, ue8m0=ue8m0)
    cache = poison_(allocate_kv_cache(3, 16, "fp8_ds", device=DEV))
    slots = _slots(24, pages=3, page_size=16)
    cache_store(kv_c, k_pe, cache, slots, ue8m0=ue8m0)
    rows = cache.view(-1, 656)[slots.long()]
    assert_exact(rows[:, :512].contiguous(), q.view(torch.uint8), "fp8_ds e4m3 values")
    assert_exact(rows[:, 512:528].contiguous().view(torch.float32), scale, "fp8_ds group scales")
    assert_exact(rows[:, 528:].contiguous().view(torch.bfloat16), k_pe.to(torch.bfloat16), "fp8_ds bf16 rope")


def test_cache_store_skips_negative_slots_and_leaves_other_slots():
    kv_c, k_pe = _tokens(8)
    slots = torch.tensor([0, -1, 5, -1, 17, 30, -1, 2], device=DEV)
    cache = poison_(allocate_kv_cache(2, 16, "bf16", device=DEV))
    cache_store(kv_c, k_pe, cache, slots)
    flat = cache.view(-1, 576)
    written = slots[slots >= 0].long()
    assert_exact(flat[written], torch.cat([kv_c, k_pe], -1)[slots >= 0], "written rows")
    untouched = torch.ones(32, dtype=torch.bool, device=DEV)
    untouched[written] = False
    assert bool(torch.isnan(flat[untouched].float()).all()), "a skipped or unrelated slot was written"


@pytest.mark.parametrize("kind,max_diff", [("fp8", 1e-3), ("fp8_ds", 1e-3)])
def test_cache_round_trip_error(kind, max_diff):
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4, rms ~1.8e-2, so calc_diff ~2e-4 on
    # gaussian data; 1e-3 is DeepGEMM's FP8 threshold. A layout/offset bug gives calc_diff ~1.
    kv_c, k_pe = _tokens(64)
    x = torch.cat([kv_c, k_pe], -1).float()
    kv_scale = quantize_fp8_per_tensor(x)[1] if kind == "fp8" else None
    cache = allocate_kv_cache(4, 16, kind, device=DEV)
    slots = _slots(64, pages=4, page_size=16)
    cache_store(kv_c, k_pe, cache, slots, kv_scale=kv_scale)
    got_c, got_pe = dequantize_kv_tokens(cache, slots, kv_scale)
    assert calc_diff(got_c, x[:, :512]) < max_diff
    assert calc_diff(got_pe, x[:, 512:]) < max_diff


def test_layout_sizes_are_the_published_ones():
    # 1152 = 576 bf16; 576 = 576 e4m3; 656 = 512 e4m3 + 4 fp32 + 64 bf16 (FlashMLA / vLLM fp8_ds_mla)
    assert [kv_cache_bytes_per_token(k) for k in ("bf16", "fp8", "fp8_ds")] == [1152, 576, 656]
    for kind in ("bf16", "fp8", "fp8_ds"):
        c = allocate_kv_cache(2, 16, kind)
        assert c.element_size() * c.shape[-1] == kv_cache_bytes_per_token(kind)
        assert kv_cache_dtype(c) == kind


def test_cache_errors_name_the_tensor():
    with pytest.raises(ValueError, match="kv_dtype"):
        allocate_kv_cache(2, 16, "fp4")
    with pytest.raises(ValueError, match="num_pages"):
        allocate_kv_cache(0, 16, "bf16")
    with pytest.raises(ValueError, match="kv_cache"):
        kv_cache_dtype(torch.zeros(2, 16, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="kv_cache"):
        kv_cache_dtype(torch.zeros(2, 16, 576, dtype=torch.float16))
    with pytest.raises(ValueError, match="kv_bytes|kv_dtype"):
        kv_cache_bytes_per_token("int8")
    kv_c, k_pe = _tokens(2)
    fp8 = allocate_kv_cache(1, 16, "fp8", device=DEV)
    slots = torch.tensor([0, 1], device=DEV)
    with pytest.raises(ValueError, match="kv_scale"):
        cache_store(kv_c, k_pe, fp8, slots)
    with pytest.raises(ValueError, match="kv_scale"):
        cache_store_ref(kv_c, k_pe, fp8, slots)
    with pytest.raises(ValueError, match="kv_scale"):
        dequantize_kv_tokens(fp8, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,ue8m0", [("bf16", False), ("fp8", False), ("fp8_ds", False), ("fp8_ds", True)])
def test_cache_store_exact_gpu(kind, ue8m0):
    # Compiled division / rounding (div_rn, cvt.rn.satfinite) against the reference, 8192 tokens.
    # The reference runs on the CPU: on CUDA, torch divides a tensor by a Python scalar (formats.fp8's
    # `amax / 448`) as a multiply by the rounded reciprocal, which is not the IEEE quotient the spec states.
    kv_c, k_pe = _tokens(8192)
    slots = _slots(8192, pages=160, page_size=64)
    kv_scale = torch.tensor(0.0123, device=DEV) if kind == "fp8" else None
    got = poison_(allocate_kv_cache(160, 64, kind, device=DEV))
    want = poison_(allocate_kv_cache(160, 64, kind))
    cache_store(kv_c, k_pe, got, slots, kv_scale=kv_scale, ue8m0=ue8m0)
    cpu_scale = kv_scale.cpu() if kv_scale is not None else None
    cache_store_ref(kv_c.cpu(), k_pe.cpu(), want, slots.cpu(), kv_scale=cpu_scale, ue8m0=ue8m0)
    assert_exact(got.view(torch.uint8), want.view(torch.uint8), f"{kind} ue8m0={ue8m0}")
