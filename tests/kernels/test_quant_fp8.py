"""FP8 / INT8 quant kernels against their references, bit for bit, at small shapes (TRITON_INTERPRET=1 on CPU).

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels/test_quant_fp8.py -q
"""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels import quant
from dsquant.kernels.quant import reference as ref
from dsquant.kernels.testing import assert_exact

from tests.kernels.test_quant_data import adversarial, gaussian

SHAPES = [(1, 128), (7, 384), (18, 256), (3, 1024 + 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check(name, args, kwargs=None):
    kwargs = kwargs or {}
    got = getattr(quant, name)(*args, **kwargs)
    want = getattr(ref, name + "_ref")(*args, **kwargs)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert_exact(a, e, f"{name} output {i}")
    return got


def _input(m, k, dtype, seed=0):
    if dtype == torch.float16:  # fp16 cannot hold the huge/tiny rows; use scaled Gaussians
        return (gaussian(m, k, seed=seed, dtype=torch.float32) * 0.5).to(dtype)
    return adversarial(m, k, seed=seed, dtype=dtype)


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32scale", "ue8m0"])
@pytest.mark.parametrize("m,k", SHAPES, ids=lambda v: str(v))
def test_quantize_fp8_per_token_group_matches_reference(m, k, ue8m0):
    _check("quantize_fp8_per_token_group", (_input(m, k, torch.bfloat16, seed=m),), {"ue8m0": ue8m0})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_fp8_per_token_group_input_dtypes(dtype):
    _check("quantize_fp8_per_token_group", (_input(9, 256, dtype),))


@pytest.mark.parametrize("group_size", [32, 64])
def test_quantize_fp8_per_token_group_other_group_sizes(group_size):
    _check("quantize_fp8_per_token_group", (adversarial(9, 256, seed=3),), {"group_size": group_size})


def test_quantize_fp8_per_token_group_column_major_scales():
    x = adversarial(11, 384, seed=4)
    q, scale = _check("quantize_fp8_per_token_group", (x,), {"column_major_scales": True})
    assert scale.shape == (11, 3) and scale.stride() == (1, 11), f"stride {scale.stride()}"
    assert scale.t().is_contiguous()


def test_quantize_fp8_per_token_group_keeps_leading_dims_and_row_strides():
    x = adversarial(2 * 3 * 5, 256, seed=5).reshape(2, 3, 5, 256)
    q, scale = _check("quantize_fp8_per_token_group", (x,))
    assert q.shape == (2, 3, 5, 256) and scale.shape == (2, 3, 5, 2)
    wide = adversarial(9, 512, seed=6)
    _check("quantize_fp8_per_token_group", (wide[:, 128:384],))  # row stride 512, no copy needed
    _check("quantize_fp8_per_token_group", (wide[:, ::2],))  # last-dim stride 2: copied first


def test_quantize_fp8_per_token_group_rejects_bad_k():
    with pytest.raises(AssertionError, match="multiple of group_size"):
        quant.quantize_fp8_per_token_group(torch.ones(2, 200, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="column-major"):
        quant.quantize_fp8_per_token_group(torch.ones(2, 2, 128), column_major_scales=True)


def test_quantize_fp8_per_token_group_empty():
    q, scale = quant.quantize_fp8_per_token_group(torch.empty(0, 256, dtype=torch.bfloat16))
    assert q.shape == (0, 256) and scale.shape == (0, 2)


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32scale", "ue8m0"])
@pytest.mark.parametrize("m,k", [(1, 7), (9, 100), (18, 512), (4, 3000)], ids=lambda v: str(v))
def test_quantize_fp8_per_token_matches_reference(m, k, ue8m0):
    _check("quantize_fp8_per_token", (_input(m, k, torch.bfloat16, seed=k),), {"ue8m0": ue8m0})


@pytest.mark.parametrize("m,k", [(1, 7), (9, 100), (18, 512), (4, 3000)], ids=lambda v: str(v))
def test_quantize_int8_per_token_matches_reference(m, k):
    _check("quantize_int8_per_token", (_input(m, k, torch.bfloat16, seed=k),))


def test_quantize_int8_per_token_rounds_ties_to_even():
    """127 sets the scale to 1; then x.5 goes to the even integer, negatives mirror, -128 never appears."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0, 3.0]])
    q, scale = _check("quantize_int8_per_token", (x,))
    assert scale.item() == 1.0
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -127, 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_input_dtypes(dtype):
    x = _input(5, 300, dtype, seed=8)
    _check("quantize_fp8_per_token", (x,))
    _check("quantize_int8_per_token", (x,))


def test_per_token_two_pass_path_for_wide_rows(monkeypatch):
    """Rows wider than ROW_TILE_MAX are read twice (amax, then codes); force that path at a small width."""
    from dsquant.kernels.quant import triton as kernels

    monkeypatch.setattr(kernels, "ROW_TILE_MAX", 64)
    x = adversarial(9, 200, seed=9)
    _check("quantize_fp8_per_token", (x,))
    _check("quantize_int8_per_token", (x,))


@pytest.mark.parametrize("n,k", [(128, 128), (200, 300), (130, 16), (1, 1), (257, 129)], ids=lambda v: str(v))
def test_quantize_fp8_block_matches_reference(n, k):
    _check("quantize_fp8_block", (adversarial(n, k, seed=n + k),))


def test_quantize_fp8_block_ue8m0_and_dtypes():
    w = adversarial(140, 260, seed=10)
    _check("quantize_fp8_block", (w,), {"ue8m0": True})
    _check("quantize_fp8_block", (w.float(),))
    _check("quantize_fp8_block", (gaussian(140, 260, seed=10).half(),))


def test_quantize_fp8_block_edge_block_takes_amax_of_real_elements():
    """Row 128 alone forms the edge block; its scale must come from its own values, not from padding."""
    w = torch.full((129, 130), 0.001, dtype=torch.bfloat16)
    w[128, 129] = 3.0
    q, scale = _check("quantize_fp8_block", (w,))
    assert scale.shape == (2, 2) and scale[1, 1].item() == pytest.approx(3.0 / 448)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(200, 300), (130, 16)], ids=lambda v: str(v))
def test_dequantize_fp8_block_matches_reference(n, k, dtype):
    q, scale = ref.quantize_fp8_block_ref(adversarial(n, k, seed=11))
    assert_exact(quant.dequantize_fp8_block(q, scale, dtype), ref.dequantize_fp8_block_ref(q, scale, dtype))


def test_dequantize_fp8_block_every_code():
    """All 254 finite E4M3 bytes (subnormals included) times a normal and a subnormal-producing scale."""
    q = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    q = q[:, q[0] != 0x7F].view(torch.float8_e4m3fn)  # drop the NaN bytes 0x7F / 0xFF: never written
    for s in (0.75, 2.0**-130):
        scale = torch.tensor([[s]])
        for dtype in DTYPES:
            assert_exact(quant.dequantize_fp8_block(q, scale, dtype), ref.dequantize_fp8_block_ref(q, scale, dtype))


def test_dequantize_fp8_block_rejects_wrong_scale_shape():
    q, scale = ref.quantize_fp8_block_ref(torch.ones(130, 256))
    with pytest.raises(ValueError, match="does not fit weight"):
        quant.dequantize_fp8_block(q, scale[:1])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(100) -> inf, intended
@pytest.mark.parametrize("m,inter", [(1, 128), (7, 256), (20, 384)], ids=lambda v: str(v))
def test_silu_mul_quantize_fp8_matches_reference(m, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(m, 2 * inter, generator=g) * 4).to(torch.bfloat16)
    gate_up[0, :8] = torch.tensor([-100.0, 100.0, -0.0, 0.0, 88.0, -88.0, 1e-30, -1e-30])  # exp over/underflow
    _check("silu_mul_quantize_fp8", (gate_up,))


def test_silu_mul_quantize_fp8_options_and_layout():
    gate_up = gaussian(10, 512, seed=12)
    _check("silu_mul_quantize_fp8", (gate_up,), {"ue8m0": True})
    q, scale = _check("silu_mul_quantize_fp8", (gate_up,), {"column_major_scales": True, "group_size": 64})
    assert q.shape == (10, 256) and scale.stride() == (1, 10)
    with pytest.raises(AssertionError, match="even"):
        quant.silu_mul_quantize_fp8(torch.ones(2, 257, dtype=torch.bfloat16))


def test_per_element_division_path_matches_reference(monkeypatch):
    """FAST_DIVISION = False: tl.div_rn per element, the path kept for comparison and as a fallback."""
    from dsquant.kernels.quant import triton as kernels

    monkeypatch.setattr(kernels, "FAST_DIVISION", False)
    x = adversarial(18, 384, seed=13)
    _check("quantize_fp8_per_token_group", (x,))
    _check("quantize_fp8_per_token", (x,))
    _check("quantize_int8_per_token", (x,))
    _check("quantize_fp8_block", (x,))


@pytest.mark.parametrize("fast", [True, False], ids=["fast-division", "div_rn"])
def test_silu_mul_both_division_paths_match_reference(monkeypatch, fast):
    """Gates down to -85 keep the program on the fast SiLU division (signed zeros, tiny gates where 1 + exp(-g)
    is 2, exp underflow at +88); a gate below -85 sends the program to tl.div_rn, which must give the same bits."""
    from dsquant.kernels.quant import triton as kernels

    monkeypatch.setattr(kernels, "SILU_FAST_DIVISION", fast)
    g = torch.Generator().manual_seed(14)
    gate_up = (torch.randn(6, 512, generator=g) * 8).clamp(min=-85).to(torch.bfloat16)
    gate_up[0, :10] = torch.tensor([-85.0, 88.0, -0.0, 0.0, 1e-30, -1e-30, 2.0**-133, -(2.0**-133), 1e-8, -1e-8])
    _check("silu_mul_quantize_fp8", (gate_up,))
    gate_up[3, 7] = -86.0  # this program takes tl.div_rn
    _check("silu_mul_quantize_fp8", (gate_up,))
