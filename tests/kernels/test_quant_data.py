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

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from dsquant.formats.fp4 import round_to_e2m1

ROW_KINDS = ("gauss", "e2m1_ties", "e4m3_ties", "int8_ties", "zeros", "sparse", "tiny", "huge", "mixed")
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


def adversarial(m: int, k: int, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[m, k] rows cycling through ROW_KINDS, each times 2^p (p uniform in [-12, 12]); finite in bf16."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(m):
        kind = ROW_KINDS[i % len(ROW_KINDS)]
        p = int(torch.randint(-12, 13, (1,), generator=g)) if kind not in ("tiny", "huge") else 0
        rows.append(_row(kind, k, g) * 2.0**p)
    return torch.stack(rows).to(dtype)


def gaussian(m: int, k: int, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain activations: N(0, 1) with a few outlier channels (x 50), as real hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randint(k, (max(1, k // 256),), generator=g)] *= 50
    return x.to(dtype)


@pytest.fixture
def exact_upcasts(monkeypatch):
    """Under TRITON_INTERPRET=1, make bf16/fp16/e4m3 -> fp32 casts exact for subnormal and NaN inputs.

    The Triton 3.6 interpreter's `_convert_float` rebuilds the exponent of a subnormal input and clamps
    it at 0 without shifting the significand, so a bf16 subnormal (1e-40) becomes +-0 in float32, and
    it widens the e4m3 NaN byte 0xFF to -480; the compiled casts are exact. tests/interpreter_fixes.py
    patches downcasts only; this patches upcasts, for one test at a time. Widening casts are exact, so
    torch performs them here.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    torch_of = {"bf16": (torch.bfloat16, torch.int16, np.uint16), "fp16": (torch.float16, torch.int16, np.uint16),
                "fp8e4nv": (torch.float8_e4m3fn, torch.uint8, np.uint8)}
    inner = interpreter._convert_float

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        src = torch_of.get(getattr(input_dtype, "name", None))
        if src is None or getattr(output_dtype, "name", None) != "fp32":
            return inner(input, input_dtype, output_dtype, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(input).view(src[2]).copy()).view(src[1]).view(src[0])
        return raw.float().view(torch.int32).numpy().view(np.uint32)

    monkeypatch.setattr(interpreter, "_convert_float", convert_float)


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
