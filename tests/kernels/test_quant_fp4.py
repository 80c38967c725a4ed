"""NVFP4 / MXFP4 quant kernels against their references, bit for bit, at small shapes (TRITON_INTERPRET=1 on CPU).

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels/test_quant_fp4.py -q
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from dsquant.kernels import quant
from dsquant.kernels.quant import reference as ref
from dsquant.kernels.quant import triton_fp4 as fp4_kernels
from dsquant.kernels.quant.triton_fp4 import (
    e2m1_codes,
    load_blocks,
    nvfp4_fast_scales,
    nvfp4_fast_words,
    store_blocks,
)
from dsquant.kernels.testing import assert_exact

from dsquant.formats.fp4 import E2M1_VALUES, pack_fp4, round_to_e2m1, unpack_fp4
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



@triton.jit
def _e2m1_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, e2m1_codes(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_e2m1_rounding_on_every_bf16_and_around_every_tie():
    """The kernels' one-add rounding against fp4.round_to_e2m1 on every finite bf16 value (every sign, exponent and
    7-bit mantissa, so every E2M1 threshold's bf16 neighbourhood) and on the 600 float32 values around each tie,
    grid point and saturation point (6, 7, 8)."""
    bf16 = (torch.arange(1 << 16, dtype=torch.int32) << 16).view(torch.float32)
    points = torch.tensor([*E2M1_TIES, *E2M1_VALUES[:8], 6.5, 7.0, 8.0]).view(torch.int32)
    near = (points[:, None] + torch.arange(-300, 300, dtype=torch.int32)).flatten().view(torch.float32)
    x = torch.cat([bf16, near, -near])
    x = x[torch.isfinite(x)]
    got = torch.empty(x.shape, dtype=torch.int32)
    _e2m1_kernel[(triton.cdiv(x.numel(), 8192),)](x, got, x.numel(), BLOCK=8192)
    assert_exact(got, round_to_e2m1(x).int(), "E2M1 codes")


@triton.jit
def _nvfp4_fast_kernel(x_ptr, pw_ptr, s_ptr, gs_ptr, bad_ptr, M, K, stride_xm, stride_pw, stride_sm,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fast NVFP4 path alone: its outputs and its out-of-range flag, whatever the flag says."""
    x, block_amax, rows, cols, mask = load_blocks(x_ptr, M, K, stride_xm, BLOCK_M, BLOCK_K, 16)
    scale, safe, rcp, bad = nvfp4_fast_scales(x, block_amax, tl.load(gs_ptr))
    words = nvfp4_fast_words(x, safe, rcp)
    store_blocks(words, scale, rows, cols, mask, pw_ptr, s_ptr, stride_pw, stride_sm, 16)
    tl.store(bad_ptr + tl.program_id(0), bad.to(tl.int32))


def _nvfp4_fast_path(x: torch.Tensor, gs: float):
    """(packed, block_scale, bad) of one program over all of x [m, k]."""
    m, k = x.shape
    packed = torch.empty(m, k // 2, dtype=torch.uint8)
    scale = torch.empty(m, k // 16, dtype=torch.float8_e4m3fn)
    bad = torch.empty(1, dtype=torch.int32)
    pw = packed.view(torch.int32)
    _nvfp4_fast_kernel[(1,)](x, pw, scale, torch.tensor(gs), bad, m, k, x.stride(0), pw.stride(0), scale.stride(0),
                             BLOCK_M=triton.next_power_of_2(m), BLOCK_K=triton.next_power_of_2(k))
    return packed, scale, bool(bad.item())


def _tame_ties(m: int, k: int, seed: int) -> torch.Tensor:
    """E2M1 ties and grid points of both signs, +0 but no -0, each 16-block holding +-6: the tie rows of the
    adversarial set inside the fast path's range."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, *E2M1_TIES])
    signs = torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0)
    x = picks[torch.randint(len(picks), (m, k), generator=g)] * signs
    x[x == 0] = 0.0  # -0.0 * 1 stays -0.0; make every zero +0.0
    x[:, ::16] = 6.0
    return x


@pytest.mark.parametrize("gs", [1.0, 0.37, 2.0**-7, 3e-3], ids=lambda v: f"gs{v:g}")
def test_nvfp4_fast_division_stays_on_its_path_and_matches_reference(gs):
    """Tame data (Gaussians with outliers, ties of both signs, e4m3-subnormal and saturated block scales) takes
    the fast path (flag clear) and gives the reference's bits without the tl.div_rn fallback."""
    for x in (gaussian(8, 256, seed=31, dtype=torch.float32), _tame_ties(8, 256, seed=32) * 2.0**-6,
              _tame_ties(8, 256, seed=33) * 2.0**4):
        packed, scale, bad = _nvfp4_fast_path(x, gs)
        assert not bad, "fast path refused tame data"
        assert_outputs_exact((packed, scale), ref.quantize_nvfp4_ref(x, torch.tensor(gs))[:2], f"nvfp4 fast gs={gs}")


@pytest.mark.parametrize("case", ["tiny negative", "negative zero", "tiny block", "tiny global scale",
                                  "huge global scale"])
def test_nvfp4_fast_division_flags_out_of_range_tiles(case):
    """Each range condition of nvfp4_fast_scales trips the per-program flag, and the kernel (taking tl.div_rn there)
    still gives the reference's bits."""
    x, gs = gaussian(4, 64, seed=34, dtype=torch.float32), 0.01
    if case == "tiny negative":
        x[1, 3] = -1e-35  # in a block of amax ~1: quotient far below 2^-100
    elif case == "negative zero":
        x[2, 5] = -0.0
    elif case == "tiny block":
        x[3, 16:32] *= 1e-32
    else:
        gs = 2.0**-110 if case == "tiny global scale" else 2.0**110
    assert _nvfp4_fast_path(x, gs)[2], f"{case} did not trip the flag"
    _nvfp4(x, torch.tensor(gs))


@pytest.mark.parametrize("fast", [True, False], ids=["fast-division", "div_rn"])
def test_quantize_nvfp4_both_division_paths_match_reference(monkeypatch, fast):
    monkeypatch.setattr(fp4_kernels, "NVFP4_FAST_DIVISION", fast)
    _nvfp4(gaussian(9, 1024 + 64, seed=35))
    _nvfp4(_tame_ties(6, 512, seed=36), torch.tensor(0.25))
    _nvfp4(adversarial(2 * len(ROW_KINDS), 256, seed=37))
