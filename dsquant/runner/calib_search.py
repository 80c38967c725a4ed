"""NVFP4 activation global-scale choice from a bounded sample of a linear's input rows.

Two methods (`dsquant convert --calibrate ... --calib-method`):

amax   global = amax / 2688 (dsquant.formats.nvfp4.nvfp4_global_scale), amax over every calibration row.
mse    (default) a power of two chosen by NVFP4 quantize-dequantize error on the sample. With
       2^m0 the smallest power of two >= amax / 2688 (no clipping on the calibration data), the
       candidates are 2^m for m = m0 - OCTAVES_DOWN .. m0 + OCTAVES_UP: below m0 they clip the
       largest blocks, above it they leave headroom (up to 4-8x the amax rule) for activations
       beyond the calibration maximum. Among the candidates whose error is within `tol` (relative)
       of the smallest, the LARGEST wins.

Why powers of two and the tie rule (measured on the demo model; benchmarks/results/runner_demo_calibration.csv):
  - Over a wide band the error does not depend on the global scale g. The block scale
    E4M3(amax_16 / 6 / g) has the same relative precision anywhere in E4M3's normal range; only
    clipping (block amaxes above 448 * 6 * g saturate) and underflow (block scales below E4M3's
    smallest normal 2^-6 lose precision, below 2^-10 they are 0) move it.
  - Inside the band, a g that is not a power of two only changes where the block scales fall on
    the E4M3 grid. On the demo that moves ppl by +-0.2 % and KLD by +-3 %, and it is noise: over
    eight alignments (one octave), the per-linear argmin on 512 calibration rows agrees with the
    argmin on held-out text for 8 of 56 linears (chance: 7; rank correlation 0.04). The amax rule
    (+1.39 % ppl against the default's +1.01 %) drew a worse alignment, and an argmin over
    quarter-octave candidates amax / 2688 * 2^(k/4) fits the calibration text's noise (+1.31 %).
    With g = 2^m, E4M3(y / 2^m) = E4M3(y) / 2^m for normal values, so every block outside the
    clipping and underflow ranges gets exactly the codes and values of the default input_scale
    1.0 (itself 2^0): calibration changes only what it should.
  - Held-out activations exceed the calibration maximum (by up to 1.33x on the demo), which the
    amax rule clips; the sample cannot show that, so free headroom is taken (largest within tol).
The error is sum((dequant(quant(x)) - x)^2) over the sample with dsquant.formats.nvfp4 (the spec),
in float64.
"""

from __future__ import annotations

import math

import torch

from dsquant.formats.nvfp4 import NVFP4_BLOCK, dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4

METHODS = ("mse", "amax")
# Candidate octaves around 2^m0: down to 1/4 (clipping the largest blocks; a squared error weighs those
# most, so these win only where clipping costs next to nothing) and up to 4x headroom (the demo's held-out
# activations exceed the calibration amax by up to 1.33x).
OCTAVES_DOWN = 2
OCTAVES_UP = 2
# Relative error margin inside which candidates count as equal. On the demo, candidates that neither clip
# nor underflow give identical errors (68 sampled linears, 64 to 512 rows each); clipping one octave costs
# 7-125 %, so 2 % only absorbs the odd block that moves in or out of E4M3's subnormals.
TOLERANCE = 0.02
# Rows kept per linear: what the search has to see (clipping, underflow) costs whole percents, which 256
# rows resolve; a V3 MoE layer's samples are then 1.2 GB of BF16 on the device.
DEFAULT_SAMPLE_ROWS = 256


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


def _amax_rule(amax: float) -> float:
    """amax / 2688, the weights' own global-scale rule (dsquant.formats.nvfp4)."""
    return float(nvfp4_global_scale(torch.tensor(amax, dtype=torch.float32)))


def candidate_scales(amax: float, grid: str = "pow2") -> list[float]:
    """Candidate global scales, ascending. grid "pow2": 2^m for m = m0 - OCTAVES_DOWN .. m0 + OCTAVES_UP with
    2^m0 the smallest power of two >= amax / 2688; grid "quarter" (measured, not used by default):
    amax / 2688 * 2^(k/4) for k = -8..4."""
    if grid not in ("pow2", "quarter"):
        raise ValueError(f"candidate grid {grid!r}: choose pow2 or quarter")
    base = _amax_rule(amax)
    if grid == "quarter":
        return sorted(float(torch.tensor(base * 2.0 ** (k / 4), dtype=torch.float32)) for k in range(-8, 5))
    m0 = math.ceil(math.log2(base))
    return [2.0**m for m in range(m0 - OCTAVES_DOWN, m0 + OCTAVES_UP + 1)]


def choose_scale(errors: dict[float, float], tol: float = TOLERANCE) -> float:
    """The largest scale whose error is within (1 + tol) of the smallest error."""
    best = min(errors.values())
    return max(s for s, e in errors.items() if e <= best * (1 + tol))


def search_input_scale(sample: torch.Tensor, amax: float, *, method: str = "mse", tol: float = TOLERANCE,
                       grid: str = "pow2") -> tuple[float, dict[float, float]]:  # fmt: skip
    """Activation global scale for a linear from its input sample [R, K] and the amax over all its rows.

    Returns (scale, {candidate: error}); the error table is empty for method "amax" and for an all-zero
    input (scale 1.0, the default: nothing to calibrate).
    """
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {METHODS}")
    if amax <= 0:
        return 1.0, {}
    if method == "amax" or sample.shape[-1] % NVFP4_BLOCK:
        return _amax_rule(amax), {}
    x = sample.float()
    errors = {c: nvfp4_qdq_error(x, c) for c in candidate_scales(amax, grid)}
    return choose_scale(errors, tol), errors
