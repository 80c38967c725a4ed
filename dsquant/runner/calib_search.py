"""NVFP4 activation global-scale choice from a bounded sample of a linear's input rows.

Two methods (`dsquant convert --calibrate ... --calib-method`):

amax   global = amax / 2688 (dsquant.formats.nvfp4.nvfp4_global_scale), amax over every calibration row.
mse    (default) the candidate with the smallest NVFP4 quantize-dequantize error on the sample, where
       the candidates are amax / 2688 * 2^(k/4) for k = -N..H (down to 2^(-N/4) of the amax rule, which
       clips the largest blocks; up to 2^(H/4) of it, headroom for activations above the calibration
       maximum) plus the recipe default (input_scale 1.0). Among the candidates whose error is within
       `tol` (relative) of the smallest, the LARGEST global scale wins.

Why the tie rule (measured on the demo model, benchmarks/results/runner_demo_calibration.csv): over
a wide range the error of NVFP4 activations does not depend on the global scale at all. The block
scale E4M3(amax_16 / 6 / global) has the same relative precision anywhere in E4M3's normal range, so
only two things move the error: clipping (block amaxes above 448 * 6 * global saturate) and underflow
(block scales below E4M3's smallest normal 2^-6 lose precision, below 2^-10 they round to zero).
Between the two the curve is flat up to noise from where the block scales fall on the E4M3 grid,
and that noise does not carry over from calibration text to other text (the per-linear argmin on the
stdlib train split and on the held-out split are uncorrelated). What does carry over is the risk:
held-out activations exceed the calibration maximum (by up to 30 % on the demo), which the amax rule
clips. So the search rejects what measurably clips or underflows and otherwise keeps the most
headroom, which is the recipe default whenever the default is not measurably worse.

The error is sum((dequant(quant(x)) - x)^2) over the sample with dsquant.formats.nvfp4 (the spec),
in float64.
"""

from __future__ import annotations

import torch

from dsquant.formats.nvfp4 import NVFP4_BLOCK, NVFP4_GLOBAL_DIVISOR, dequantize_nvfp4, quantize_nvfp4

METHODS = ("mse", "amax")
# Candidate exponents k in amax / 2688 * 2^(k/4): quarter-octave steps from 1/4 of the amax rule to 2x it.
STEPS_DOWN = 8
STEPS_UP = 4
# Relative error margin inside which candidates count as equal. The spread between grid alignments
# on the demo's samples is 0.1-1 % and does not generalize (see above); clipping the top quarter
# octave costs 5-60 %, underflow similar, so 2 % separates the two.
TOLERANCE = 0.02
# Rows kept per linear. The default's excess error over the best candidate on the sample is noise that
# shrinks with the sample (demo, 84 MLP linears: 128 rows -> 4 linears moved off the default by more
# than TOLERANCE, 256 -> 3, 512 -> 1, 1024 -> 0); 512 keeps a V3 MoE layer's samples at 2.4 GB of BF16.
DEFAULT_SAMPLE_ROWS = 512


class RowSample:
    """A uniform sample of at most `cap` rows of everything passed to add() (reservoir sampling), and
    the running max |x| over all rows. Memory: cap * K * itemsize of the first batch's dtype."""

    def __init__(self, cap: int = DEFAULT_SAMPLE_ROWS, seed: int = 0):
        if cap < 1:
            raise ValueError(f"calibration sample size must be at least 1 row, got {cap}")
        self.cap, self.seen, self.amax = cap, 0, 0.0
        self.rows: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        """x [..., K]: every row counts towards amax; kept rows are copies (x may be reused)."""
        x = x.detach().reshape(-1, x.shape[-1])
        m = x.shape[0]
        if m == 0:
            return
        self.amax = max(self.amax, float(x.abs().amax()))
        if self.rows is None:
            self.rows = torch.empty(min(self.cap, m), x.shape[1], dtype=x.dtype, device=x.device)
        n = self.seen
        fill = max(0, min(self.cap - n, m))
        if fill:
            if n + fill > self.rows.shape[0]:  # grow to what has been seen, never beyond cap
                grown = torch.empty(min(self.cap, n + m), x.shape[1], dtype=x.dtype, device=x.device)
                grown[:n] = self.rows[:n]
                self.rows = grown
            self.rows[n : n + fill] = x[:fill]
        if fill < m:  # row i (global index n + i) replaces slot j ~ U[0, n + i] when j < cap
            idx = torch.arange(n + fill, n + m, dtype=torch.float64)
            j = (torch.rand(m - fill, generator=self._gen, dtype=torch.float64) * (idx + 1)).long()
            keep = j < self.cap
            if bool(keep.any()):
                src = torch.arange(fill, m)[keep].to(x.device)
                # a slot drawn twice in one batch keeps one of its rows: still a uniform sample to first order
                self.rows[j[keep].to(x.device)] = x[src]
        self.seen = n + m

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()

    def sample(self) -> torch.Tensor:
        return self.rows[: min(self.seen, self.cap)]


def nvfp4_qdq_error(x: torch.Tensor, global_scale: float) -> float:
    """sum((dequant(quant(x)) - x)^2) in float64 for NVFP4 with this activation global scale (the spec)."""
    g = torch.tensor(global_scale, dtype=torch.float32, device=x.device)
    packed, bs, gs = quantize_nvfp4(x, g, name="calibration sample")
    d = dequantize_nvfp4(packed, bs, gs, dtype=torch.float32)
    return float((d.double() - x.double()).pow(2).sum())


def candidate_scales(amax: float, default: float | None = None, steps_down: int = STEPS_DOWN,
                     steps_up: int = STEPS_UP) -> list[float]:  # fmt: skip
    """Candidate global scales, ascending: amax / 2688 * 2^(k/4) for k = -steps_down..steps_up, and default."""
    base = torch.tensor(amax, dtype=torch.float32) / NVFP4_GLOBAL_DIVISOR
    cands = {float(base * 2.0 ** (k / 4)) for k in range(-steps_down, steps_up + 1)}
    if default is not None:
        cands.add(float(default))
    return sorted(c for c in cands if c > 0)


def choose_scale(errors: dict[float, float], tol: float = TOLERANCE) -> float:
    """The largest scale whose error is within (1 + tol) of the smallest error."""
    best = min(errors.values())
    return max(s for s, e in errors.items() if e <= best * (1 + tol))


def search_input_scale(sample: torch.Tensor, amax: float, *, method: str = "mse", default: float | None = 1.0,
                       tol: float = TOLERANCE) -> tuple[float, dict[float, float]]:  # fmt: skip
    """Activation global scale for a linear from its input sample [R, K] and the amax over all its rows.

    Returns (scale, {candidate: error}); the error table is empty for method "amax".
    """
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {METHODS}")
    if amax <= 0:
        return (default if default is not None else 1.0), {}
    if method == "amax" or sample.shape[-1] % NVFP4_BLOCK:
        return float(torch.tensor(amax, dtype=torch.float32) / NVFP4_GLOBAL_DIVISOR), {}
    x = sample.float()
    errors = {c: nvfp4_qdq_error(x, c) for c in candidate_scales(amax, default)}
    return choose_scale(errors, tol), errors
