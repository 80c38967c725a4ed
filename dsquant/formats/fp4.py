"""FP4 E2M1 elements, shared by NVFP4 and MXFP4.

Code layout (4 bits): bit 3 is the sign, bits 2..0 index the magnitudes
[0, 0.5, 1, 1.5, 2, 3, 4, 6]. Codes 8..15 are the negatives; code 8 is -0.

Rounding: round to nearest, ties to even code, saturating at +-6 (E2M1 has no Inf or NaN).
The tie thresholds on |x| are 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
5 -> 4 (ml_dtypes, torchao and the sm_100 `cvt.rn.satfinite.e2m1x2` agree). The sign is taken
from `x < 0`: -0.0 encodes as code 0, a small negative that rounds to zero as code 8.

Packing: two codes per byte along the last (K) dim, element 2i in the low nibble and element
2i+1 in the high nibble, so an [N, K] matrix is stored as uint8 [N, K // 2] (ModelOpt,
compressed-tensors, gpt-oss and vLLM all use this order).
"""

from __future__ import annotations

import torch

FP4_E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# (threshold, inclusive): |x| above (or at, when inclusive) the threshold moves one code up.
# Inclusive exactly where the tie goes up to the even code.
E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 values already divided by their scale -> uint8 E2M1 codes (0..15), same shape."""
    a = x.abs()
    mag = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold, inclusive in E2M1_THRESHOLDS:
        mag += (a >= threshold if inclusive else a > threshold).to(torch.uint8)
    return mag | ((x < 0).to(torch.uint8) << 3)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) -> float32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> uint8 [..., K // 2], even element in the low nibble."""
    assert codes.shape[-1] % 2 == 0, f"K={codes.shape[-1]} must be even to pack FP4"
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)
