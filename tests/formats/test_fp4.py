"""E2M1 element rounding and packing: golden ties, all 16 codes, ml_dtypes agreement, properties."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsquant.formats.fp4 import E2M1_VALUES, e2m1_to_float, pack_fp4, round_to_e2m1, unpack_fp4

# (input, expected code): every tie goes to the even code; beyond 6 saturates.
GOLDEN = [
    (0.25, 0x0),  # tie 0 / 0.5 -> 0
    (0.2500001, 0x1),
    (0.75, 0x2),  # tie 0.5 / 1 -> 1.0 (code 2, even)
    (1.25, 0x2),  # tie 1 / 1.5 -> 1.0
    (1.75, 0x4),  # tie 1.5 / 2 -> 2.0
    (2.5, 0x4),  # tie 2 / 3 -> 2.0
    (3.5, 0x6),  # tie 3 / 4 -> 4.0
    (5.0, 0x6),  # tie 4 / 6 -> 4.0
    (5.0000005, 0x7),
    (6.0, 0x7),
    (6.5, 0x7),  # saturates
    (1e30, 0x7),
    (-0.75, 0xA),
    (-5.0, 0xE),
    (-1e30, 0xF),
    (0.0, 0x0),
    (-0.0, 0x0),  # sign from x < 0: negative zero encodes as +0
    (-0.1, 0x8),  # a negative that rounds to zero keeps its sign: code 8 (-0)
]


@pytest.mark.parametrize("value,code", GOLDEN, ids=lambda v: repr(v))
def test_round_to_e2m1_golden(value, code):
    assert int(round_to_e2m1(torch.tensor([value], dtype=torch.float32))[0]) == code


def test_all_16_codes_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_to_float(codes)
    assert values.tolist() == list(E2M1_VALUES)
    back = round_to_e2m1(values)
    # -0.0 (code 8) encodes as +0 by the sign rule; every other code is its own fixed point.
    expected = codes.clone()
    expected[8] = 0
    assert torch.equal(back, expected)


def test_round_to_e2m1_matches_ml_dtypes_on_dense_grid():
    # Every float32 step of 1/1024 in [-8, 8], plus random values: an independent RNE implementation.
    x = torch.cat([torch.arange(-8192, 8193, dtype=torch.float32) / 1024, torch.randn(100_000) * 3])
    ours = e2m1_to_float(round_to_e2m1(x)).numpy()
    ref = x.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)  # -0 == +0 here; the sign rule is tested by GOLDEN


def test_pack_order_even_element_in_low_nibble():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8]], dtype=torch.uint8)
    assert pack_fp4(codes).tolist() == [[0x21, 0x8F]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_round_trip(codes):
    t = torch.tensor([codes], dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(t)), t)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=64))
def test_round_to_e2m1_sign_symmetry(values):
    x = torch.tensor(values, dtype=torch.float32)
    pos, neg = round_to_e2m1(x), round_to_e2m1(-x)
    nonzero = x != 0
    assert torch.equal(neg[nonzero], pos[nonzero] ^ 0x8)
