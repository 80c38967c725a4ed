"""Adversarial inputs for the quant kernel tests (imported by test_quant_*.py), and tests that they are adversarial.

Every row of `adversarial(m, k)` is one case, cycling through ROW_KINDS, scaled by a per-row power of
two so that exact ties survive the scaling:
    gauss      Gaussian times 10^u, u uniform in [-6, 6]
    e2m1_ties  the E2M1 grid and its midpoints (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5), +-0, small values
               that round to +-0; every 16-block holds +-6 so NVFP4/MXFP4 scales are the row's 2^p
    e4m3_ties  midpoints of the E4M3 grid; every 128-group holds 448 * 2^p, so the FP8 scale is 2^p
    int8_ties  k + 0.5 for integers k, the row holds 127 * 2^p, so the INT8 scale is 2^p
    zeros      +0 and -0 only
    sparse     mostly +-0 with a few Gaussians: all-zero blocks inside non-zero rows
    tiny       bf16 subnormals and tiny normals (amax below the FP8 floor 1e-4, MXFP4 scale byte 0)
    huge       values near 1e35 (MXFP4 scale bytes near 254; NVFP4 block scales saturating at 448)
    mixed      each 16-block has its own magnitude 10^u, u in [-10, 10] (E4M3 block scales underflow
               to subnormals and to zero against a per-tensor global scale)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
import triton
import triton.language as tl
from dsquant.kernels.exact_div import div_rn_shared
from dsquant.kernels.testing import assert_exact

from dsquant.formats.fp4 import round_to_e2m1

ROW_KINDS = ("gauss", "e2m1_ties", "e4m3_ties", "int8_ties", "zeros", "sparse", "tiny", "huge", "mixed")
TAME_KINDS = tuple(kind for kind in ROW_KINDS if kind != "huge")
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_PICKS = torch.tensor([0.0, -0.0, 0.1, -0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, *E2M1_TIES])


def _e4m3_midpoints() -> torch.Tensor:
    """Every midpoint between consecutive positive finite E4M3 values (all exact in bf16)."""
    v = np.arange(0, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return torch.from_numpy((v[:-1] + v[1:]) / 2)


def _signs(shape, g):
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


def _row(kind: str, k: int, g: torch.Generator) -> torch.Tensor:
    """One float32 row of `kind`, before the per-row power-of-two scaling."""
    if kind == "gauss":
        return torch.randn(k, generator=g) * 10.0 ** (torch.rand(1, generator=g) * 12 - 6)
    if kind == "e2m1_ties":
        r = _E2M1_PICKS[torch.randint(len(_E2M1_PICKS), (k,), generator=g)] * _signs(k, g)
        r[::16] = 6.0 * _signs(r[::16].shape, g)
        return r
    if kind == "e4m3_ties":
        mids = _e4m3_midpoints()
        r = mids[torch.randint(len(mids), (k,), generator=g)] * _signs(k, g)
        r[::128] = 448.0
        return r
    if kind == "int8_ties":
        r = (torch.randint(-127, 127, (k,), generator=g) + 0.5).float()
        r[0] = -127.0
        return r
    if kind == "zeros":
        return torch.zeros(k) * _signs(k, g)
    if kind == "sparse":
        return torch.where(torch.rand(k, generator=g) < 0.02, torch.randn(k, generator=g), 0.0 * _signs(k, g))
    if kind == "tiny":
        return torch.randn(k, generator=g) * torch.where(torch.rand(k, generator=g) < 0.5, 2.0**-130, 1e-30)
    if kind == "huge":
        return torch.randn(k, generator=g) * 1e35
    assert kind == "mixed", kind
    mags = 10.0 ** (torch.rand(-(-k // 16), generator=g) * 20 - 10)
    return torch.randn(k, generator=g) * mags.repeat_interleave(16)[:k]


def assert_outputs_exact(got: tuple, want: tuple, what: str) -> None:
    """assert_exact over a kernel's output tuple (0-d tensors such as NVFP4's global scale as [1])."""
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert_exact(a.reshape(-1) if a.dim() == 0 else a, e.reshape(-1) if e.dim() == 0 else e, f"{what} output {i}")


def adversarial(
    m: int, k: int, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, kinds: tuple[str, ...] = ROW_KINDS
) -> torch.Tensor:
    """[m, k] rows cycling through `kinds`, each times 2^p (p uniform in [-12, 12]); finite in bf16.

    Leave out "huge" where one tensor-wide scale (NVFP4's global scale) would otherwise flush every
    other row to zero codes.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(m):
        kind = kinds[i % len(kinds)]
        p = int(torch.randint(-12, 13, (1,), generator=g)) if kind not in ("tiny", "huge") else 0
        rows.append(_row(kind, k, g) * 2.0**p)
    return torch.stack(rows).to(dtype)


def gaussian(m: int, k: int, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain activations: N(0, 1) with a few outlier channels (x 50), as real hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randint(k, (max(1, k // 256),), generator=g)] *= 50
    return x.to(dtype)


def division_cases(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, d) float32 pairs, d > 0, for checking div_rn_shared against tl.div_rn: random bit patterns over
    2^-60..2^60, divisors with mantissas near 2 (reciprocal at the bottom of its binade, the hardest case),
    dividends whose mantissa is near the divisor's (quotient just under a power of two), exact quotients
    (x = d * small integer or E2M1/E4M3 midpoints, all exactly representable), and signed zeros."""
    g = torch.Generator().manual_seed(seed)

    def floats(exp_lo, exp_hi, size):
        mant = torch.randint(0, 1 << 23, (size,), generator=g, dtype=torch.int64)
        exp = torch.randint(exp_lo + 127, exp_hi + 128, (size,), generator=g, dtype=torch.int64)
        return ((exp << 23) | mant).to(torch.int32).view(torch.float32)

    q = n // 4
    d = floats(-60, 60, n)
    top = torch.randint(0, 1 << 8, (q,), generator=g).to(torch.int32)  # mantissa 0x7FFFxx: d ~ 2^e * 1.99998
    d[:q] = (((d[:q].view(torch.int32) >> 23) << 23) | (0x7FFF00 | top)).view(torch.float32)
    x = floats(-60, 60, n)
    near = x[q : 2 * q].view(torch.int32)  # x's mantissa = d's mantissa +- a few ulps
    x[q : 2 * q] = ((near >> 23 << 23) | ((d[q : 2 * q].view(torch.int32) & 0x7FFFFF) + torch.randint(
        -4, 5, (q,), generator=g).to(torch.int32)).clamp(0, 0x7FFFFF)).view(torch.float32)
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 1.0625, 3.0, 7.0, 448.0, 127.5, 126.5])
    exact = grid[torch.randint(len(grid), (q,), generator=g)]
    x[2 * q : 3 * q] = (d[2 * q : 3 * q].double() * exact.double()).float()  # exact when it fits 24 bits
    x = x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[-8:] = torch.tensor([0.0, -0.0] * 4)
    return x, d


@triton.jit
def _division_kernel(x_ptr, d_ptr, fast_ptr, exact_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    d = tl.load(d_ptr + offs, mask=mask, other=1.0)
    tl.store(fast_ptr + offs, div_rn_shared(x, d, tl.div_rn(1.0, d)), mask=mask)
    tl.store(exact_ptr + offs, tl.div_rn(x, d), mask=mask)


def check_div_rn_shared(x: torch.Tensor, d: torch.Tensor) -> None:
    """div_rn_shared == tl.div_rn bit for bit wherever the quotient is a normal float32 (or zero)."""
    fast, exact = torch.empty_like(x), torch.empty_like(x)
    _division_kernel[(triton.cdiv(x.numel(), 1024),)](x, d, fast, exact, x.numel(), BLOCK=1024)
    assert torch.equal(exact, (x.double() / d.double()).float()), "tl.div_rn is not IEEE here"
    normal = (exact.abs() >= 2.0**-126) | (exact == 0)
    bad = normal & (fast.view(torch.int32) != exact.view(torch.int32))
    assert not bool(bad.any()), f"{int(bad.sum())} of {int(normal.sum())} differ: x={x[bad][:3]} d={d[bad][:3]}"


def test_div_rn_shared_matches_div_rn():
    x, d = division_cases(1 << 14, seed=3)
    check_div_rn_shared(x, d)


def test_e2m1_rows_hit_every_tie_exactly():
    """At unit scale (amax 6 per block) the E2M1 rows contain each tie and both zeros; else ties are untested."""
    x = adversarial(len(ROW_KINDS), 64, seed=1).float()
    row = x[ROW_KINDS.index("e2m1_ties")]
    scale = row.abs().reshape(-1, 16).amax(-1).repeat_interleave(16) / 6  # a power of two per row
    scaled = (row / scale).abs()
    hit = {t for t in E2M1_TIES if bool((scaled == t).any())}
    assert len(hit) >= 5, f"only ties {sorted(hit)} occur"
    assert bool((round_to_e2m1(row / scale) == 8).any()), "no small negative that rounds to code 8 (-0)"


def test_rows_are_finite_and_kinds_differ():
    x = adversarial(2 * len(ROW_KINDS), 256, seed=2)
    assert bool(torch.isfinite(x.float()).all())
    zeros = x[ROW_KINDS.index("zeros")]
    assert not zeros.float().any() and bool(torch.signbit(zeros.float()).any())
    assert float(x[ROW_KINDS.index("huge")].float().abs().max()) > 1e34
    tiny = x[ROW_KINDS.index("tiny")].float().abs()
    assert 0 < float(tiny.max()) < 1e-4 and bool(((tiny > 0) & (tiny < 2.0**-126)).any())  # bf16 subnormals
