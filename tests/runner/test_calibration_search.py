"""NVFP4 activation-scale search (calib_search.py) against an independent brute force, and the bounded sample."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from dsquant.cli import cmd_convert
from dsquant.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from dsquant.runner import calib_search
from dsquant.runner.calib_search import RowSample, candidate_scales, choose_scale, search_input_scale

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def brute_error(x: np.ndarray, g: float) -> float:
    """NVFP4 quantize-dequantize squared error, element by element with ml_dtypes' E4M3 and a nearest-value
    E2M1 search (not dsquant.formats): block scale E4M3(min(amax16 / 6 / g, 448)), code = nearest of
    |x| / (scale * g) (ties to the even code, saturating at 6), value = code * scale * g."""
    g32 = np.float32(g)
    err = 0.0
    for row in x.astype(np.float32):
        for b in range(0, row.size, 16):
            blk = row[b : b + 16]
            s = np.float32(min(np.float32(np.float32(np.abs(blk).max()) / np.float32(6)) / g32, np.float32(448)))
            s = np.float32(np.array(s, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
            denom = np.float32(s * g32)
            for v in blk:
                if denom == 0:
                    q = np.float32(0)
                else:
                    a = np.float32(abs(v) / denom)
                    d = np.abs(E2M1 - a)
                    ties = np.flatnonzero(d == d.min())
                    idx = ties[0] if len(ties) == 1 or ties[0] % 2 == 0 else ties[1]
                    q = np.float32(np.sign(v) * E2M1[idx] * denom)
                err += (float(q) - float(v)) ** 2
    return err


def _data(scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 64, generator=g)
    x[torch.rand(6, 64, generator=g) < 0.05] *= 20  # outlier channels, as activations have
    return x * scale


@pytest.mark.parametrize("x", [_data(2000.0), _data(1e-3), _data(1.0, seed=2)])
@pytest.mark.parametrize("grid", ["pow2", "quarter"])
def test_errors_and_argmin_agree_with_the_brute_force(x, grid):
    amax = float(x.abs().max())
    chosen, errors = search_input_scale(x, amax, tol=0.0, grid=grid)
    brute = {c: brute_error(x.numpy(), c) for c in candidate_scales(amax, grid)}
    assert set(errors) == set(brute) and len(brute) >= 5
    for c in brute:  # the spec path and the brute force agree on every candidate's error
        assert errors[c] == pytest.approx(brute[c], rel=1e-9, abs=1e-30), c
    assert brute[chosen] == pytest.approx(min(brute.values()), rel=1e-12)


def test_candidates_are_powers_of_two_around_the_amax_rule():
    c = candidate_scales(30.0)  # 30 / 2688 = 0.01116 -> 2^m0 = 2^-6 = 0.015625
    assert c == [2.0**m for m in range(-6 - calib_search.OCTAVES_DOWN, -6 + calib_search.OCTAVES_UP + 1)]
    assert c[calib_search.OCTAVES_DOWN] >= 30.0 / 2688 > c[calib_search.OCTAVES_DOWN - 1]


def test_a_squared_error_keeps_a_lone_outlier_rather_than_the_bulk():
    # bulk blocks near 1e-4, one block at 5e3: every no-clip scale underflows the bulk to 0, yet clipping the
    # outlier costs far more squared error, so the search (like the brute force) keeps it unclipped
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 1e-4
    x[0, :16] = 5e3
    amax = float(x.abs().max())
    chosen, _ = search_input_scale(x, amax, tol=0.0)
    brute = {c: brute_error(x.numpy(), c) for c in candidate_scales(amax)}
    assert brute[chosen] == min(brute.values())
    assert chosen >= candidate_scales(amax)[calib_search.OCTAVES_DOWN]  # at or above the no-clip scale


def test_headroom_is_taken_when_free_and_gives_the_default_codes():
    # block amaxes within [0.2, 50]: neither 1.0 nor the headroom candidates clip or underflow any block
    x = _data(1.0, seed=1).clamp(-50, 50)
    x[x.abs() < 0.2] = 0.2
    amax = float(x.abs().max())
    chosen, errors = search_input_scale(x, amax)
    top = candidate_scales(amax)[-1]
    best = min(errors.values())
    assert chosen == max(c for c, e in errors.items() if e <= best * 1.02) == top
    # a power-of-two global scale gives exactly the values of the uncalibrated input_scale 1.0
    a, b = quantize_nvfp4(x, torch.tensor(chosen)), quantize_nvfp4(x, torch.tensor(1.0))
    assert torch.equal(dequantize_nvfp4(*a, dtype=torch.float32), dequantize_nvfp4(*b, dtype=torch.float32))
    assert torch.equal(a[0], b[0])


def test_tie_rule():
    assert choose_scale({1.0: 1.03, 0.5: 1.0, 0.25: 1.01}, tol=0.02) == 0.5
    assert choose_scale({1.0: 1.02, 0.5: 1.0}, tol=0.02) == 1.0


def test_amax_method_and_degenerate_inputs():
    x = _data(3.0)
    amax = float(x.abs().max())
    s, errors = search_input_scale(x, amax, method="amax")
    assert s == pytest.approx(amax / 2688, rel=1e-7) and errors == {}
    assert search_input_scale(torch.zeros(2, 32), 0.0)[0] == 1.0  # a linear fed only zeros
    with pytest.raises(ValueError, match="calibration method 'max'"):
        search_input_scale(x, amax, method="max")


def test_row_sample_is_bounded_uniform_and_keeps_the_true_amax():
    s = RowSample(cap=64, seed=0)
    for i in range(10):
        rows = torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None].repeat(1, 32)
        rows[:, 1] = 0.5
        s.add(rows.view(4, 25, 32))  # leading dims are flattened
        assert s.rows.shape[0] <= 64 and s.nbytes <= 64 * 32 * 4
    assert s.seen == 1000 and s.amax == 999.0
    kept = s.sample()[:, 0]
    assert kept.shape == (64,) and kept.unique().numel() == 64  # distinct input rows, copied whole
    assert bool((s.sample()[:, 1] == 0.5).all())
    # a uniform sample of 0..999: mean 499.5, standard error 289 / 8 = 36; the first-64 rows would give 31.5
    assert abs(float(kept.mean()) - 499.5) < 150
    small = RowSample(cap=64)
    small.add(torch.ones(3, 16))
    assert small.sample().shape == (3, 16) and small.nbytes == 3 * 16 * 4  # never more than was seen
    with pytest.raises(ValueError, match="at least 1 row"):
        RowSample(cap=0)


def test_cli_constants_match_the_search_module():
    assert cmd_convert.CALIB_METHODS == calib_search.METHODS
    assert cmd_convert.CALIB_ROWS == calib_search.DEFAULT_SAMPLE_ROWS
