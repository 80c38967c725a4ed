"""Rotary embedding on DeepSeek's interleaved pairs, in place, from a cos/sin cache: the spec.

DeepSeek-V3 (`inference/model.py` `apply_rotary_emb`) rotates consecutive pairs (x[2i], x[2i+1])
by the angle pos * freq[i] (a complex multiply). The cache holds cos and sin of those angles,
float32 [max_pos, R/2] (YaRN frequencies and the mscale factor are folded in when it is built).
Arithmetic, in float32, result cast back to the tensor's dtype:
    out[2i]   = x[2i] * cos[p, i] - x[2i+1] * sin[p, i]
    out[2i+1] = x[2i] * sin[p, i] + x[2i+1] * cos[p, i]
MLA applies it to the rope part of every query head and to the single shared latent key.
"""

from __future__ import annotations

import math

import torch


def rope_cache_ref(
    rope_dim: int, max_pos: int, theta: float = 10000.0, rope_scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [max_pos, rope_dim // 2] with DeepSeek's YaRN frequency blend when rope_scaling is yarn."""
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))  # [R/2]
    mscale = 1.0
    if rope_scaling:
        factor = float(rope_scaling["factor"])
        orig = int(rope_scaling.get("original_max_position_embeddings", 4096))
        beta_fast, beta_slow = float(rope_scaling.get("beta_fast", 32)), float(rope_scaling.get("beta_slow", 1))

        def correction_dim(num_rot: float) -> float:
            return rope_dim * math.log(orig / (num_rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp (DeepSeek linear_ramp_factor)
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
        # cos/sin carry mscale(factor, mscale) / mscale(factor, mscale_all_dim) (vLLM, transformers); 1 on V3
        m, m_all = float(rope_scaling.get("mscale", 1.0)), float(rope_scaling.get("mscale_all_dim", 0.0))
        mscale = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m_all else _yarn_mscale(factor, m)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), freqs)  # [P, R/2]
    return angles.cos() * mscale, angles.sin() * mscale


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope_ref(
    q_pe: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> None:
    """Rotate in place. q_pe [T, H, R], k_pe [T, R] (views into q / the latent row are fine),
    cos/sin float32 [P, R/2], positions int [T]."""
    c, s = cos[positions], sin[positions]  # [T, R/2]
    rotate_pairs_(q_pe, c[:, None, :], s[:, None, :])
    rotate_pairs_(k_pe, c, s)


def rotate_pairs_(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> None:
    """Rotate the interleaved pairs of x [..., R] in place by cos/sin c, s broadcastable to [..., R/2]."""
    xf = x.float()
    xe, xo = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((xe * c - xo * s, xe * s + xo * c), dim=-1).flatten(-2)
    x.copy_(out.to(x.dtype))


def rotate_halves_(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> None:
    """Rotate x [..., R] in place as NeoX-style halves (x[i], x[i + R/2]) by cos/sin c, s broadcastable to
    [..., R/2] (the V3.2 indexer's layout, unlike MLA's interleaved pairs)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype))
