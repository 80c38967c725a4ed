"""The harness fixes make interpreted casts and bf16 dots agree with torch (and so with compiled kernels)."""

import os

import numpy as np
import pytest
import torch

from tests.interpreter_fixes import fma_float32

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _cast_kernel(x_ptr, f8_ptr, bf_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(f8_ptr + offs, x.to(tl.float8e4nv))
    tl.store(bf_ptr + offs, x.to(tl.bfloat16))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr):
    r = tl.arange(0, M)
    a = tl.load(a_ptr + r[:, None] * M + r[None, :])
    b = tl.load(b_ptr + r[:, None] * M + r[None, :])
    tl.store(c_ptr + r[:, None] * M + r[None, :], tl.dot(a, b))


def test_downcasts_round_to_nearest_even():
    # Exact E4M3 and bf16 midpoints (where truncation and half-up rounding differ from RNE) plus noise.
    base = torch.tensor([1.0625, 1.1875, 3.25, -5.5, 0.001953125 * 1.5, 240.0 + 8.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    x = torch.cat([base, torch.randn(1024 - base.numel()) * 50])
    f8 = torch.empty(1024, dtype=torch.float8_e4m3fn)
    bf = torch.empty(1024, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, f8, bf, N=1024)
    assert torch.equal(f8.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(bf.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_bf16_dot_multiplies_values():
    a = torch.randn(16, 16).bfloat16()
    b = torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, M=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


@triton.jit
def _runtime_loop_kernel(x_ptr, out_ptr, n):
    acc = 0.0
    for i in range(0, n):  # a loop bound read at run time
        acc += tl.load(x_ptr + i)
    tl.store(out_ptr, acc)


def test_runtime_loop_bounds():
    x = torch.arange(10, dtype=torch.float32)
    out = torch.empty(1)
    _runtime_loop_kernel[(1,)](x, out, 10)
    assert out.item() == 45.0


def test_fma_float32_rounds_once():
    """Cases where two roundings differ from one: the product's low bits decide a float32 tie."""
    x = np.float32(1 + 2.0**-12)
    got = fma_float32(np.array([x]), np.array([x]), np.array([np.float32(-1)]))  # 2^-11 + 2^-24 exactly
    assert got[0] == np.float32(2.0**-11 + 2.0**-24)
    assert np.float32(x * x) - np.float32(1) != got[0]  # the two-rounding result loses the 2^-24
    a, b = np.float32(1 + 2.0**-23), np.float32(1 - 2.0**-24)
    # a * b = 1 + 2^-24 - 2^-47: a float64 sum rounds it to the float32 midpoint 1 + 2^-24; one rounding gives 1
    assert fma_float32(np.array([a]), np.array([b]), np.array([np.float32(0)]))[0] == np.float32(1)


@triton.jit
def _widen_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_widening_keeps_subnormals_and_nan(dtype):
    bits = torch.arange(256, dtype=torch.int32)
    x = (bits.to(torch.int16) if dtype == torch.bfloat16 else bits.to(torch.uint8)).view(dtype)
    out = torch.empty(256)
    _widen_kernel[(1,)](x, out, N=256)
    expected = x.float()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(out[~torch.isnan(out)], expected[~torch.isnan(expected)])
