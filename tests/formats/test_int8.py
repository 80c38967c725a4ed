"""INT8 symmetric quantization: golden ties, numpy agreement, bounds and properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsquant.formats.int8 import dequantize_int8, quantize_int8_per_channel, quantize_int8_per_token


def test_ties_round_half_to_even_and_range_is_symmetric():
    # amax 127 -> scale 1, so x/scale is x itself.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0, 126.5]])
    q, s = quantize_int8_per_token(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -127, 126]]


def test_zero_row_has_finite_scale_and_zero_codes():
    q, s = quantize_int8_per_channel(torch.zeros(3, 64))
    assert torch.isfinite(s).all() and (s > 0).all()
    assert not q.any()


def test_matches_numpy_rint():
    torch.manual_seed(0)
    x = torch.randn(64, 512) * torch.logspace(-3, 3, 64)[:, None]
    q, s = quantize_int8_per_token(x)
    xn = x.numpy()
    sn = np.maximum(np.abs(xn).max(axis=1, keepdims=True), np.float32(1e-10)) / np.float32(127)
    ref = np.clip(np.rint(xn / sn), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(q.numpy(), ref)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_raises(bad):
    x = torch.randn(4, 16)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="experts.3.up_proj"):
        quantize_int8_per_channel(x, name="experts.3.up_proj")


_rows = st.tuples(st.integers(1, 8), st.integers(1, 300), st.floats(-20, 20), st.integers(0, 2**31 - 1))


def _tensor(spec):
    m, k, log_scale, seed = spec
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale


@settings(max_examples=50, deadline=None)
@given(_rows)
def test_round_trip_error_at_most_half_a_step(spec):
    x = _tensor(spec)
    q, s = quantize_int8_per_token(x)
    err = (dequantize_int8(q, s, torch.float32) - x).abs()
    assert bool((err <= s * 0.5 * (1 + 1e-5)).all())


@settings(max_examples=50, deadline=None)
@given(_rows)
def test_requantize_is_identity_on_codes_and_sign_symmetric(spec):
    x = _tensor(spec)
    q, s = quantize_int8_per_token(x)
    q2, _ = quantize_int8_per_token(dequantize_int8(q, s, torch.float32))
    assert torch.equal(q2, q)
    qn, sn = quantize_int8_per_token(-x)
    assert torch.equal(qn, -q) and torch.equal(sn, s)
