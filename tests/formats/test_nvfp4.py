"""NVFP4: two-level scales, golden blocks, an independent ml_dtypes implementation, properties."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsquant.formats.fp4 import unpack_fp4
from dsquant.formats.nvfp4 import dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4


def _nvfp4_numpy(x: np.ndarray):
    """Independent twin: numpy float32 arithmetic in the documented order, ml_dtypes for both casts."""
    amax = np.abs(x).max()
    gs = np.float32(amax / np.float32(2688)) if amax > 0 else np.float32(1.0)
    xb = x.reshape(x.shape[0], -1, 16)
    bamax = np.abs(xb).max(axis=-1)
    bs = np.minimum(bamax / np.float32(6) / gs, np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
    denom = (bs.astype(np.float32) * gs)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(denom > 0, xb / denom, np.float32(0)).astype(np.float32)
    values = scaled.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return values.reshape(x.shape), bs.astype(np.float32), gs


def test_matches_independent_numpy_twin():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * np.exp(rng.uniform(-6, 6, (64, 1)))).astype(np.float32)
    x[3, :16] = 0  # an all-zero block
    values, bs, gs = _nvfp4_numpy(x)
    packed, block_scale, global_scale = quantize_nvfp4(torch.from_numpy(x))
    assert global_scale.item() == gs
    np.testing.assert_array_equal(block_scale.float().numpy(), bs)
    from dsquant.formats.fp4 import e2m1_to_float

    np.testing.assert_array_equal(e2m1_to_float(unpack_fp4(packed)).numpy(), values)


def test_golden_block():
    # amax 2688 -> global scale 1; block amax 6 -> block scale 1; values on the grid are exact.
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0
    x[0, 16:24] = torch.tensor([6.0, -6.0, 0.75, 1.25, 2.5, 5.0, -0.25, 0.1])
    packed, bs, gs = quantize_nvfp4(x)
    assert gs.item() == 1.0
    assert bs.float().tolist() == [[448.0, 1.0]]
    codes = unpack_fp4(packed)[0, 16:24].tolist()
    assert codes == [0x7, 0xF, 0x2, 0x2, 0x4, 0x6, 0x8, 0x0]
    assert packed.shape == (1, 16) and bs.shape == (1, 2) and bs.dtype == torch.float8_e4m3fn


def test_zero_tensor():
    packed, bs, gs = quantize_nvfp4(torch.zeros(2, 32))
    assert gs.item() == 1.0 and not packed.any() and not bs.float().any()
    assert not dequantize_nvfp4(packed, bs, gs).float().any()


def test_given_global_scale_saturates_blocks_above_its_range():
    x = torch.full((1, 16), 100.0)
    packed, bs, gs = quantize_nvfp4(x, global_scale=torch.tensor(0.01))
    assert gs.item() == pytest.approx(0.01)
    assert bs.float().item() == 448.0  # 100 / 6 / 0.01 = 1667 clamps to 448
    assert (unpack_fp4(packed) == 0x7).all()  # and every element saturates at 6


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="not a multiple of 16"):
        quantize_nvfp4(torch.randn(2, 24), name="w")
    x = torch.randn(2, 32)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.5.mlp.experts.7.gate_proj.weight"):
        quantize_nvfp4(x, name="layers.5.mlp.experts.7.gate_proj.weight")


_mats = st.tuples(st.integers(1, 4), st.integers(1, 6), st.floats(-10, 10), st.integers(0, 2**31 - 1))


def _mat(spec):
    m, kb, log_scale, seed = spec
    return torch.randn(m, kb * 16, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale


def _normal_blocks(bs):
    return bs.float() >= 2**-6  # E4M3 normal range; subnormal block scales lose relative precision


@settings(max_examples=50, deadline=None)
@given(_mats)
def test_round_trip_error_bound(spec):
    # The widest E2M1 gap is 4 -> 6, so an element is off by at most one unit of its block's scale.
    x = _mat(spec)
    packed, bs, gs = quantize_nvfp4(x)
    err = (dequantize_nvfp4(packed, bs, gs, torch.float32) - x).abs().reshape(x.shape[0], -1, 16)
    unit = (bs.float() * gs).unsqueeze(-1)
    ok = err <= unit * (1 + 1e-6)
    assert bool(ok[_normal_blocks(bs)].all())


@settings(max_examples=50, deadline=None)
@given(_mats)
def test_requantize_with_same_global_scale_is_identity(spec):
    x = _mat(spec)
    packed, bs, gs = quantize_nvfp4(x)
    p2, bs2, _ = quantize_nvfp4(dequantize_nvfp4(packed, bs, gs, torch.float32), gs)
    normal = _normal_blocks(bs)
    assert torch.equal(bs2.float()[normal], bs.float()[normal])
    c1 = unpack_fp4(packed).reshape(x.shape[0], -1, 16)
    c2 = unpack_fp4(p2).reshape(x.shape[0], -1, 16)
    assert torch.equal(c1[normal] & 0x7, c2[normal] & 0x7)  # -0 and +0 may swap: both decode to 0


@settings(max_examples=50, deadline=None)
@given(_mats)
def test_sign_symmetry(spec):
    x = _mat(spec)
    p, bs, gs = quantize_nvfp4(x)
    pn, bsn, gsn = quantize_nvfp4(-x)
    assert torch.equal(bs.float(), bsn.float()) and gs == gsn
    assert torch.equal(dequantize_nvfp4(pn, bsn, gsn, torch.float32), -dequantize_nvfp4(p, bs, gs, torch.float32))


def test_global_scale_formula():
    assert nvfp4_global_scale(torch.tensor(2688.0)).item() == 1.0
    assert nvfp4_global_scale(torch.tensor(0.0)).item() == 1.0
