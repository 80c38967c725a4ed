"""FP8 E4M3 quantization: exhaustive codes, ml_dtypes agreement, golden edges, block layout, properties."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsquant.formats.fp8 import (
    FP8_AMAX_FLOOR,
    FP8_DTYPE,
    ceil_to_ue8m0,
    dequantize_fp8,
    dequantize_fp8_block,
    dequantize_fp8_per_token_group,
    quantize_fp8_block,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
    quantize_fp8_per_token_group,
)


def _finite_e4m3_patterns() -> torch.Tensor:
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = bits.view(FP8_DTYPE).float()
    return bits[torch.isfinite(values)]


def test_all_finite_e4m3_codes_are_fixed_points():
    # With amax = 448 the scale is exactly 1, so every representable value must map to its own code.
    bits = _finite_e4m3_patterns()
    assert bits.numel() == 254  # 0x7F and 0xFF are the NaNs of E4M3 fn
    x = bits.view(FP8_DTYPE).float()
    q, scale = quantize_fp8_per_tensor(x)
    assert float(scale) == 1.0
    assert torch.equal(q.view(torch.uint8), bits)


def test_fp8_cast_matches_ml_dtypes():
    # The float32 -> E4M3 cast the spec relies on, against an independent implementation.
    x = torch.cat([torch.randn(200_000) * 100, torch.randn(10_000) * 1e-2, torch.linspace(-448, 448, 30_001)])
    ours = x.clamp(-448, 448).to(FP8_DTYPE).float().numpy()
    ref = x.clamp(-448, 448).numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)


def test_per_token_group_golden():
    x = torch.zeros(2, 256)
    x[0, 5] = 448.0 * 3  # group amax 1344 -> scale 3, value 1344 -> code 448
    x[0, 6] = -3 * 2**-9  # smallest E4M3 subnormal after scaling
    x[0, 200] = 1.0  # second group: scale 1/448
    # row 1 is all zero: the amax floor 1e-4 keeps the scale finite
    q, s = quantize_fp8_per_token_group(x)
    assert s.shape == (2, 2)
    assert s[0, 0].item() == pytest.approx(3.0, rel=0, abs=0)
    assert q[0, 5].float().item() == 448.0
    assert q[0, 6].view(torch.uint8).item() == 0x81  # -2^-9: sign | smallest subnormal
    assert s[0, 1].item() == torch.tensor(1.0 / 448, dtype=torch.float32).item()
    assert q[0, 200].float().item() == 448.0
    assert torch.equal(s[1], torch.full((2,), FP8_AMAX_FLOOR, dtype=torch.float32) / 448)
    assert not q[1].float().any()
    back = dequantize_fp8_per_token_group(q, s, dtype=torch.float32)
    assert back[0, 5].item() == 1344.0


def test_ue8m0_scales_are_the_next_power_of_two():
    s = torch.tensor([1.0, 1.5, 2.0, 3.0, 2**-20 * 1.0001, 448.0, 1e-4 / 448])
    got = ceil_to_ue8m0(s)
    expected = torch.tensor([2.0 ** math.ceil(math.log2(v)) for v in s.double().tolist()], dtype=torch.float32)
    assert torch.equal(got, expected)
    x = torch.randn(4, 512) * 7
    q, scale = quantize_fp8_per_token_group(x, ue8m0=True)
    mant = scale.view(torch.int32) & 0x7FFFFF
    assert not mant.any()
    assert bool((scale * 448 >= x.abs().reshape(4, 4, 128).amax(-1)).all())


def test_block_partial_edges_take_amax_of_real_elements():
    torch.manual_seed(0)
    w = torch.randn(2112, 200, dtype=torch.bfloat16)  # 16.5 x 128 rows, 1.56 x 128 cols
    q, s = quantize_fp8_block(w)
    assert q.shape == (2112, 200) and q.dtype == FP8_DTYPE
    assert s.shape == (17, 2) and s.dtype == torch.float32
    edge = w[2048:, 128:].float().abs().amax()
    assert s[16, 1].item() == (edge / 448).item()
    back = dequantize_fp8_block(q, s, dtype=torch.float32)
    rel = (back - w.float()).abs() / w.float().abs().clamp(min=1e-3)
    assert rel.max().item() <= 2**-4 + 1e-6


def test_dequantize_block_rejects_mismatched_scale():
    q = torch.zeros(256, 256, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="block scale shape"):
        dequantize_fp8_block(q, torch.ones(3, 2))


@pytest.mark.parametrize("fn", [quantize_fp8_per_tensor, quantize_fp8_per_token, quantize_fp8_per_token_group,
                                quantize_fp8_block])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_naming_the_tensor(fn, bad):
    x = torch.randn(128, 128)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight"):
        fn(x, name="model.layers.0.mlp.down_proj.weight")


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quantize_fp8_per_token_group(torch.randn(2, 200), name="x")


_matrices = st.tuples(st.integers(1, 3), st.integers(1, 3), st.floats(-12, 12), st.integers(0, 2**31 - 1))


def _matrix(shape_seed):
    rows, cols, log_scale, seed = shape_seed
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows * 50, cols * 70, generator=g) * 2.0**log_scale


@settings(max_examples=40, deadline=None)
@given(_matrices, st.booleans())
def test_block_round_trip_error_bound(spec, ue8m0):
    # E4M3 has 3 mantissa bits: a normal value is off by at most 2^-4 relative; subnormals by half
    # the subnormal step 2^-10 times the scale.
    w = _matrix(spec)
    q, s = quantize_fp8_block(w, ue8m0=ue8m0)
    back = dequantize_fp8_block(q, s, dtype=torch.float32)
    from dsquant.formats.fp8 import expand_block_scale

    bound = torch.maximum(w.abs() * 2**-4, expand_block_scale(s, w.shape) * 2**-10)
    assert bool(((back - w).abs() <= bound * (1 + 1e-6)).all())


@settings(max_examples=40, deadline=None)
@given(_matrices)
def test_requantizing_dequantized_weights_gives_the_same_codes(spec):
    # The block max dequantizes to 448 * s, so the new scale is s up to one float32 rounding and
    # every element lands on its old code again (E4M3 midpoints are 2^-5 away, far beyond 2^-22).
    w = _matrix(spec)
    q, s = quantize_fp8_block(w)
    q2, s2 = quantize_fp8_block(dequantize_fp8_block(q, s, dtype=torch.float32))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.allclose(s2, s, rtol=2**-22, atol=0)


@settings(max_examples=40, deadline=None)
@given(_matrices)
def test_requantizing_ue8m0_is_exact_in_value(spec):
    # With power-of-two scales dequantization is exact; a requantized block may pick a smaller
    # power of two (its max code can be below 448), but the values it encodes are the same.
    w = _matrix(spec)
    q, s = quantize_fp8_block(w, ue8m0=True)
    back = dequantize_fp8_block(q, s, dtype=torch.float32)
    q2, s2 = quantize_fp8_block(back, ue8m0=True)
    assert torch.equal(dequantize_fp8_block(q2, s2, dtype=torch.float32), back)


@settings(max_examples=40, deadline=None)
@given(_matrices)
def test_sign_symmetry(spec):
    x = _matrix(spec)
    q, s = quantize_fp8_per_token(x)
    qn, sn = quantize_fp8_per_token(-x)
    assert torch.equal(s, sn)
    assert torch.equal(qn.view(torch.uint8), q.view(torch.uint8) ^ 0x80)
    assert torch.equal(dequantize_fp8(qn, sn, torch.float32), -dequantize_fp8(q, s, torch.float32))


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)], ids=["block_multiple", "ragged"])
def test_dequantize_fp8_block_is_the_expanded_product(shape):
    """Whole 128x128 blocks broadcast the scale grid instead of expanding it: the same float32 products."""
    from dsquant.formats.fp8 import expand_block_scale

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    q, s = quantize_fp8_block(w)
    want = (q.float() * expand_block_scale(s, shape)).bfloat16()
    assert torch.equal(dequantize_fp8_block(q, s).view(torch.int16), want.view(torch.int16))
