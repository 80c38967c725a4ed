"""Top-k / top-p sampling from probabilities, threshold form: the spec the Triton kernel matches exactly.

Per row of probs [B, V] (float32, non-negative; they need not sum to 1), with the row's top_k (<= 0 or
>= V: no limit), top_p (>= 1: no limit) and a uniform draw u in [0, 1) supplied by the caller (so the
kernel and this reference sample the same token):
    total   = sum(p)                                            (float64)
    theta_k = the k-th largest p                                (0 without a limit)
    theta_p = the largest value t among the p with  sum(p_i for p_i >= t) >= top_p * total
              (the smallest nucleus by value; 0 without a limit)
    keep    = p_i >= max(theta_k, theta_p)   (ties at the threshold are all kept)
    token   = the first i, in id order, whose inclusive float64 cumulative kept mass exceeds
              u * (kept mass); the last kept id if rounding leaves none.
Thresholds are found on the float32 bit patterns (ordered like the values for p >= 0), so the kernel's
bisection lands on exactly the same value; sums are float64 on both sides.
"""

from __future__ import annotations

import torch


def top_k_top_p_sample_ref(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """probs float32 [B, V], top_k int32 [B], top_p float32 [B], uniform float32 [B] -> token ids int64 [B]."""
    b, v = probs.shape
    p = probs.float()
    out = torch.empty(b, dtype=torch.long, device=probs.device)
    for r in range(b):
        row = p[r]
        srt = row.sort(descending=True).values
        k = int(top_k[r])
        theta_k = srt[k - 1] if 0 < k < v else srt.new_zeros(())
        theta_p = srt.new_zeros(())
        if float(top_p[r]) < 1.0:
            target = float(top_p[r]) * row.double().sum()
            # mass of {p >= srt[j]}: the cumulative sum up to the end of srt[j]'s group of ties
            ends = torch.searchsorted(-srt, -srt, right=True) - 1
            ok = torch.nonzero(srt.double().cumsum(0)[ends] >= target)
            theta_p = srt[ok[0, 0]] if ok.numel() else srt.new_zeros(())
        keep = row >= torch.maximum(theta_k, theta_p)
        kept = torch.where(keep, row.double(), torch.zeros((), dtype=torch.float64, device=row.device))
        cum = kept.cumsum(0)
        hit = torch.nonzero((cum > float(uniform[r]) * cum[-1]) & keep)
        out[r] = hit[0, 0] if hit.numel() else torch.nonzero(keep)[-1, 0]
    return out
