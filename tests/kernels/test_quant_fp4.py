"""NVFP4 / MXFP4 quant kernels against their references, bit for bit, at small shapes (TRITON_INTERPRET=1 on CPU).

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels/test_quant_fp4.py -q
"""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels import quant
from dsquant.kernels.quant import reference as ref
from dsquant.kernels.testing import assert_exact

from dsquant.formats.fp4 import E2M1_VALUES, pack_fp4, unpack_fp4
from tests.kernels.test_quant_data import (
    E2M1_TIES,
    ROW_KINDS,
    TAME_KINDS,
    adversarial,
    assert_outputs_exact,
    gaussian,
)

SHAPES = [(1, 16), (7, 96), (18, 256), (3, 1024 + 64)]


def _nvfp4(x, global_scale=None):
    got = quant.quantize_nvfp4(x, global_scale)
    assert_outputs_exact(got, ref.quantize_nvfp4_ref(x, global_scale), "quantize_nvfp4")
    return got


def _mxfp4(x, rule="ocp"):
    got = quant.quantize_mxfp4(x, rule)
    assert_outputs_exact(got, ref.quantize_mxfp4_ref(x, rule), f"quantize_mxfp4[{rule}]")
    return got


@pytest.mark.parametrize("m,k", SHAPES, ids=lambda v: str(v))
def test_quantize_nvfp4_computed_global_scale_matches_reference(m, k):
    _nvfp4(adversarial(m, k, seed=m + k))
    _nvfp4(adversarial(m, k, seed=m + k, kinds=TAME_KINDS))  # without 1e35 rows flushing the rest to 0
    _nvfp4(gaussian(m, k, seed=m + k))


@pytest.mark.parametrize("gs", [1.0, 2.0**-7, 0.37, 3e-3], ids=lambda v: f"gs{v:g}")
def test_quantize_nvfp4_given_global_scale_matches_reference(gs):
    """Powers of two keep the E2M1 rows' ties exact after scaling; 0.37 and 3e-3 are arbitrary floats."""
    x = adversarial(2 * len(ROW_KINDS), 128, seed=21)
    _nvfp4(x, torch.tensor(gs))  # 1e35 rows saturate their block scales at 448
    _nvfp4(x, torch.tensor([gs]))  # a [1] tensor, as compressed-tensors stores it
    _nvfp4(adversarial(2 * len(TAME_KINDS), 128, seed=21, kinds=TAME_KINDS), torch.tensor(gs))


def test_quantize_nvfp4_ties_and_signs_at_unit_scale():
    """Global scale 1 and block amax 6 give block scale 1: the kernel sees the ties and zeros unscaled."""
    values = torch.tensor([6.0, *E2M1_TIES, -0.0, 0.0, -0.1, 0.1, *(-t for t in E2M1_TIES)])
    x = values.repeat(1, 2)[:, :32]
    packed, block_scale, _ = _nvfp4(x, torch.tensor(1.0))
    codes = unpack_fp4(packed)[0, :16].tolist()
    # ties to even: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; -0.0 -> code 0;
    # -0.1 and -0.25 round to zero with the sign kept: code 8
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 0, 0, 8, 0, 8, 10, 10, 12], codes
    assert block_scale.float()[0].tolist() == [1.0, 1.0]


def test_quantize_nvfp4_block_scale_edges():
    """Block scales that saturate at 448, land on E4M3 subnormals, and underflow to zero (codes 0)."""
    x = torch.zeros(1, 64)
    x[0, 0:16] = 6.0 * 1000  # amax / 6 / gs = 1000 -> clamped to 448
    x[0, 16:32] = torch.linspace(-1, 1, 16) * 6 * 2.0**-8  # 2^-8: an E4M3 subnormal block scale
    x[0, 32:48] = torch.linspace(-1, 1, 16) * 6 * 2.0**-12  # below half the smallest subnormal: scale 0
    x[0, 48:64] = -0.0
    packed, block_scale, _ = _nvfp4(x, torch.tensor(1.0))
    assert block_scale.float()[0].tolist() == [448.0, 2.0**-8, 0.0, 0.0]
    assert not unpack_fp4(packed)[0, 32:].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_quantize_nvfp4_input_dtypes(dtype):
    _nvfp4(gaussian(9, 128, seed=22).to(dtype))
    _nvfp4(gaussian(9, 128, seed=22).to(dtype), torch.tensor(0.01))


def test_quantize_nvfp4_leading_dims_zero_and_empty():
    packed, block_scale, gs = _nvfp4(adversarial(12, 64, seed=23).reshape(2, 6, 64))
    assert packed.shape == (2, 6, 32) and block_scale.shape == (2, 6, 4) and gs.shape == ()
    packed, block_scale, gs = _nvfp4(torch.zeros(3, 32))
    assert gs.item() == 1.0 and not packed.any()
    packed, block_scale, gs = quant.quantize_nvfp4(torch.empty(0, 32))
    assert packed.shape == (0, 16) and gs.item() == 1.0


def test_quantize_nvfp4_rejects_bad_input():
    with pytest.raises(AssertionError, match="multiple of 16"):
        quant.quantize_nvfp4(torch.ones(2, 24))
    with pytest.raises(AssertionError, match="one value"):
        quant.quantize_nvfp4(torch.ones(2, 32), torch.ones(2))


@pytest.mark.parametrize("rule", ["ocp", "ceil"])
@pytest.mark.parametrize("m,k", [(1, 32), (7, 96), (18, 256), (3, 1024 + 64)], ids=lambda v: str(v))
def test_quantize_mxfp4_matches_reference(m, k, rule):
    _mxfp4(adversarial(m, k, seed=m * k), rule)


def test_quantize_mxfp4_scale_rules_at_the_edges():
    """amax 7 (mantissa 1.75): ocp keeps 2^0 and clips 7 to 6, ceil takes 2^1; zero block -> byte 0."""
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 7.0, 2.5  # block 0
    x[0, 32] = 6.0  # block 1: mantissa 1.5, both rules 2^0
    x[0, 64] = 2.0**-130  # block 2: a bf16/fp32 subnormal amax, exponent clamped to -127
    ocp_packed, ocp_scale = _mxfp4(x, "ocp")
    ceil_packed, ceil_scale = _mxfp4(x, "ceil")
    assert ocp_scale[0].tolist() == [127, 127, 0, 0] and ceil_scale[0].tolist() == [128, 127, 0, 0]
    assert unpack_fp4(ocp_packed)[0, :2].tolist() == [7, 4]  # 7 -> 6 (clipped), 2.5 -> 2 (tie to even)
    assert unpack_fp4(ceil_packed)[0, :2].tolist() == [6, 2]  # 3.5 -> 4, 1.25 -> 1


def test_quantize_mxfp4_rejects_unknown_rule():
    with pytest.raises(ValueError, match="unknown MXFP4 scale rule"):
        quant.quantize_mxfp4(torch.ones(1, 32), "floor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_nvfp4_matches_reference(dtype):
    packed, block_scale, gs = ref.quantize_nvfp4_ref(adversarial(18, 128, seed=24))
    assert_exact(quant.dequantize_nvfp4(packed, block_scale, gs, dtype),
                 ref.dequantize_nvfp4_ref(packed, block_scale, gs, dtype), "dequantize_nvfp4")


def test_dequantize_nvfp4_every_code_and_scale():
    """All 16 codes in both nibbles against all 254 finite E4M3 block scales (NaN bytes 0x7F/0xFF are
    never written; their rows only need to come out NaN)."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(256, 2)  # [256, 32]: each code in both nibble positions
    codes[:, 16:] = codes[:, 16:].flip(-1)
    packed = pack_fp4(codes)
    block_scale = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(256, 1).repeat(1, 2)
    finite = torch.ones(256, dtype=torch.bool)
    finite[[0x7F, 0xFF]] = False
    for gs in (1.0, 2.0**-20, 3.0):
        got = quant.dequantize_nvfp4(packed, block_scale, torch.tensor(gs), torch.float32)
        want = ref.dequantize_nvfp4_ref(packed, block_scale, torch.tensor(gs), torch.float32)
        assert_exact(got[finite], want[finite], f"gs={gs}")
        assert bool(got[~finite].isnan().all())
    assert got[1, :16].tolist() == [v * 2.0**-9 * 3.0 for v in E2M1_VALUES]  # byte 1 = smallest subnormal 2^-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequantize_mxfp4_every_code_and_scale(dtype):
    """All 16 codes against all 255 E8M0 bytes, subnormal (0..2) and overflowing (bf16 inf) results included."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(255, 2)
    packed = pack_fp4(codes)
    scale = torch.arange(255, dtype=torch.uint8).reshape(255, 1)
    assert_exact(quant.dequantize_mxfp4(packed, scale, dtype), ref.dequantize_mxfp4_ref(packed, scale, dtype))


def test_dequantize_rejects_mismatched_scales():
    packed, block_scale, gs = ref.quantize_nvfp4_ref(torch.ones(2, 64))
    with pytest.raises(ValueError, match="does not fit"):
        quant.dequantize_nvfp4(packed, block_scale[:, :2], gs)
    packed, scale = ref.quantize_mxfp4_ref(torch.ones(2, 64))
    with pytest.raises(ValueError, match="does not fit"):
        quant.dequantize_mxfp4(packed[:1], scale)


def test_round_trip_through_kernels_is_exact_on_the_grid():
    """Values already on the MXFP4 grid (E2M1 x 2^e) survive quantize -> dequantize unchanged."""
    g = torch.Generator().manual_seed(25)
    grid = torch.tensor(E2M1_VALUES)[torch.randint(16, (8, 64), generator=g)]
    grid[:, ::32] = 6.0  # block amax 6: scale 2^0 under both rules
    x = (grid * 2.0 ** torch.randint(-20, 20, (8, 1), generator=g)).to(torch.bfloat16)
    assert_exact(quant.dequantize_mxfp4(*quant.quantize_mxfp4(x)), x + 0.0)  # + 0.0: -0.0 encodes as code 0

