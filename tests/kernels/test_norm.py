"""RMSNorm / fused add + RMSNorm: Triton kernel vs the reference (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch
from dsquant.kernels.norm.reference import fused_add_rms_norm_ref, rms_norm_ref
from dsquant.kernels.norm.triton import fused_add_rms_norm, rms_norm
from dsquant.kernels.testing import assert_exact, calc_diff

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(rows, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * torch.logspace(-3, 2, rows)[:, None]).to(dtype)  # varied row scale
    r = torch.randn(rows, d, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    return x.to(DEV), r.to(DEV), w.to(DEV)


def _check(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    # The sum of squares is reduced in a different order (tree vs torch), a float32 rounding difference
    # of ~1e-7 relative in rstd; after rounding to bf16 that moves at most one ulp (2^-8 relative).
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    err = ((actual.float() - expected.float()).abs() / expected.float().abs().clamp(min=1e-6)).max().item()
    assert err <= ulp, f"{what}: max relative error {err:.2e}"
    assert calc_diff(actual, expected) < 1e-9, f"{what}: calc_diff {calc_diff(actual, expected):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,d", [(1, 64), (7, 96), (5, 123)], ids=lambda v: str(v))
def test_rms_norm_matches_reference(rows, d, dtype):
    x, _, w = _inputs(rows, d, dtype)
    _check(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype, f"rms_norm {rows=} {d=}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_add_rms_norm_matches_reference(dtype):
    x, r, w = _inputs(6, 160, dtype)
    y, res = fused_add_rms_norm(x, r, w, 1e-6)
    y_ref, res_ref = fused_add_rms_norm_ref(x, r, w, 1e-6)
    assert_exact(res, res_ref, "residual sum (one rounding of x + r to the dtype, as the reference)")
    _check(y, y_ref, dtype, "fused_add_rms_norm")


def test_rms_norm_strided_rows_and_zero_rows():
    x, _, w = _inputs(8, 64, torch.float32)
    view = x[::2]  # row stride 128, last dim contiguous
    _check(rms_norm(view, w), rms_norm_ref(view, w), torch.float32, "strided rows")
    zero = torch.zeros(3, 64, device=DEV)
    assert torch.equal(rms_norm(zero, w), torch.zeros_like(zero)), "an all-zero row must give zeros (eps)"
    assert rms_norm(torch.empty(0, 64, device=DEV), w).shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [512, 1536, 7168], ids=lambda d: f"D{d}")
def test_rms_norm_deepseek_shapes_gpu(d):
    x, r, w = _inputs(4096, d, torch.bfloat16)
    _check(rms_norm(x, w), rms_norm_ref(x, w), torch.bfloat16, f"rms_norm D={d}")
    y, res = fused_add_rms_norm(x, r, w)
    y_ref, res_ref = fused_add_rms_norm_ref(x, r, w)
    assert_exact(res, res_ref, f"residual D={d}")
    _check(y, y_ref, torch.bfloat16, f"fused D={d}")
