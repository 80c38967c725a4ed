"""MXFP4: E8M0 scale rules (OCP and ceil) against exact float arithmetic, golden blocks, properties."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsquant.formats.fp4 import unpack_fp4
from dsquant.formats.mxfp4 import dequantize_mxfp4, e8m0_to_float, mxfp4_scale_exponent, quantize_mxfp4


def _ocp_exponent(amax: float) -> int:
    # floor(log2 amax) - 2 from math.frexp: amax = m * 2^E with m in [0.5, 1).
    if amax == 0:
        return -127
    return max(-127, min(127, math.frexp(amax)[1] - 1 - 2))


def _ceil_exponent(amax: float) -> int:
    # The smallest e with 6 * 2^e >= amax, searched with exact float comparisons.
    if amax == 0:
        return -127
    e = math.frexp(amax)[1] - 4
    while 6.0 * 2.0**e < amax:
        e += 1
    return max(-127, min(127, e))


@pytest.mark.parametrize("rule,ref", [("ocp", _ocp_exponent), ("ceil", _ceil_exponent)])
def test_scale_exponent_matches_exact_arithmetic(rule, ref):
    rng = np.random.default_rng(1)
    amax = np.concatenate([
        np.exp(rng.uniform(-80, 80, 20_000)),
        [6.0, 6.0000005, 7.0, 12.0, 1.5, 3.0, 2.0**-126, 2.0**-130, 0.0, 3e38],
        6.0 * 2.0 ** np.arange(-20, 20),
    ]).astype(np.float32)
    got = mxfp4_scale_exponent(torch.from_numpy(amax), rule).tolist()
    assert got == [ref(float(a)) for a in amax]


def test_golden_blocks():
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([6.0, 3.0, -1.5, 0.25])  # amax 6: both rules give scale 1
    x[1, :2] = torch.tensor([7.0, 3.5])  # amax 7: ocp scale 1 clips 7 -> 6; ceil scale 2 -> 3.5, 1.75
    # row 2 all zero -> E8M0 byte 0
    p_ocp, s_ocp = quantize_mxfp4(x, scale_rule="ocp")
    p_ceil, s_ceil = quantize_mxfp4(x, scale_rule="ceil")
    assert s_ocp[:, 0].tolist() == [127, 127, 0]
    assert s_ceil[:, 0].tolist() == [127, 128, 0]
    assert unpack_fp4(p_ocp)[0, :4].tolist() == [0x7, 0x5, 0xB, 0x0]
    assert unpack_fp4(p_ocp)[1, :2].tolist() == [0x7, 0x6]  # 7 saturates to 6; 3.5 ties to 4
    assert unpack_fp4(p_ceil)[1, :2].tolist() == [0x6, 0x4]  # 3.5 ties to 4; 1.75 ties to 2
    assert not unpack_fp4(p_ocp)[2].any()


def test_e8m0_decoding_matches_ml_dtypes():
    b = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    ref = b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(e8m0_to_float(b).numpy(), ref)


def test_default_rule_has_lower_error_on_gaussian_blocks():
    # Why "ocp" is the default: clipping one value per block costs less than a coarser grid for all.
    x = torch.randn(20_000, 32, generator=torch.Generator().manual_seed(0))
    err = {}
    for rule in ("ocp", "ceil"):
        p, s = quantize_mxfp4(x, scale_rule=rule)
        err[rule] = ((dequantize_mxfp4(p, s, torch.float32) - x) ** 2).mean().item()
    assert err["ocp"] < err["ceil"]
    p, s = quantize_mxfp4(x)
    assert torch.equal(s, quantize_mxfp4(x, scale_rule="ocp")[1])


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown MXFP4 scale rule"):
        quantize_mxfp4(torch.randn(1, 32), scale_rule="round")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quantize_mxfp4(torch.randn(1, 48))
    x = torch.randn(1, 32)
    x[0, 1] = float("inf")
    with pytest.raises(ValueError, match="w_inf"):
        quantize_mxfp4(x, name="w_inf")


_mats = st.tuples(st.integers(1, 4), st.integers(1, 4), st.floats(-30, 30), st.integers(0, 2**31 - 1),
                  st.sampled_from(["ocp", "ceil"]))


def _mat(spec):
    m, kb, log_scale, seed, rule = spec
    return torch.randn(m, kb * 32, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale, rule


@settings(max_examples=60, deadline=None)
@given(_mats)
def test_round_trip_error_bound(spec):
    # ceil: nothing clips, so the error is at most the widest half-gap (1) times the scale.
    # ocp: the block max can clip from below 8 to 6, so at most 2 times the scale.
    x, rule = _mat(spec)
    p, s = quantize_mxfp4(x, scale_rule=rule)
    unit = e8m0_to_float(s).repeat_interleave(32, dim=-1)
    err = (dequantize_mxfp4(p, s, torch.float32) - x).abs()
    assert bool((err <= unit * (1.0 if rule == "ceil" else 2.0)).all())


@settings(max_examples=60, deadline=None)
@given(_mats)
def test_requantize_is_identity_and_sign_symmetric(spec):
    x, rule = _mat(spec)
    p, s = quantize_mxfp4(x, scale_rule=rule)
    back = dequantize_mxfp4(p, s, torch.float32)
    p2, s2 = quantize_mxfp4(back, scale_rule=rule)
    assert torch.equal(dequantize_mxfp4(p2, s2, torch.float32), back)
    pn, sn = quantize_mxfp4(-x, scale_rule=rule)
    assert torch.equal(sn, s)
    assert torch.equal(dequantize_mxfp4(pn, sn, torch.float32), -back)
