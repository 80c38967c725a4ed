"""MXFP4 (OCP Microscaling): E2M1 elements with one E8M0 (power-of-two) scale per 32 along K.

Elements: E2M1 codes packed two per byte along K, exactly as NVFP4 (fp4.py). K % 32 == 0.
Scale: E8M0 byte b, value 2^(b - 127); b = 255 is NaN and never written. The exponent e of the
block amax is found from its float32 bits (no log2, so kernels match exactly):
    amax = m * 2^E, m in [1, 2)  (E = biased exponent field - 127)
    rule "ocp" (default): e = E - 2 = floor(log2 amax) - emax(E2M1), the OCP MX v1.0 rule. The
        block max lands in [4, 8) and is clipped to 6 when it is above 6 (m > 1.5).
    rule "ceil": the smallest 2^e with 6 * 2^e >= amax, i.e. e = E - 2 if m <= 1.5 else E - 1
        (triton_kernels' `downcast_to_mxfp`). The block max never clips, but every element of
        such a block gets a grid twice as coarse.
    e is clamped to [-127, 127]; an all-zero block gets b = 0.
Default: "ocp". It is the published standard, and clipping one value of a block costs less than
coarsening all 32: measured relative MSE on 100k blocks of 32, ocp vs ceil, Gaussian 0.01323 vs
0.01334, Laplace 0.0160 vs 0.0174, Student-t(3) 0.0203 vs 0.0227 (tests/formats/test_mxfp4.py
checks that ocp stays the lower on Gaussian data).
Quantize: code = E2M1(x_fp32 / 2^e) (division by a power of two is exact).
Dequantize: e2m1_value * 2^(b - 127).

On disk (compressed-tensors `mxfp4-pack-quantized`): `<name>.weight_packed` uint8 [N, K/2] and
`<name>.weight_scale` uint8 [N, K/32] (E8M0 bytes). No global scale.
DeepSeek-V4 routed experts (`expert_dtype: fp4`): `<name>.weight` I8 [N, K/2] and `<name>.scale` F8_E8M0
[N, K/32]: the same bytes under other dtypes (deepseek-v4.md 1.4).
NaN/Inf input raises ValueError.
"""

from __future__ import annotations

import torch

from dsquant.formats._checks import check_divisible, check_finite
from dsquant.formats.fp4 import e2m1_to_float, pack_fp4, round_to_e2m1, unpack_fp4

MXFP4_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_DTYPE = torch.float8_e8m0fnu
MXFP4_SCALE_RULES = ("ceil", "ocp")


def mxfp4_scale_exponent(amax: torch.Tensor, rule: str = "ocp") -> torch.Tensor:
    """float32 block amax -> unbiased int32 scale exponent e (scale = 2^e), clamped to [-127, 127]."""
    if rule not in MXFP4_SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose one of {MXFP4_SCALE_RULES}")
    bits = amax.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - E8M0_BIAS  # E
    if rule == "ocp":
        e = exp - 2
    else:
        e = exp - 2 + ((bits & 0x7FFFFF) > 0x400000).to(torch.int32)  # m > 1.5 -> one more
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def e8m0_bytes(scale: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """E8M0 scales as their uint8 bytes, from any 1-byte storage: compressed-tensors writes uint8, DeepSeek-V4
    `torch.float8_e8m0fnu` (safetensors F8_E8M0)."""
    if scale.dtype == torch.uint8:
        return scale
    if scale.element_size() != 1:
        raise ValueError(f"{name}: E8M0 scales must be 1-byte values, got {scale.dtype}")
    return scale.view(torch.uint8)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8 or float8_e8m0fnu) -> float32 2^(b - 127), exact (b = 0 gives the subnormal 2^-127;
    b = 255 is NaN)."""
    b = e8m0_bytes(scale).int()
    value = torch.ldexp(torch.ones(scale.shape, dtype=torch.float32, device=scale.device), b - E8M0_BIAS)
    return torch.where(b == E8M0_NAN, torch.full_like(value, float("nan")), value)


def e8m0_from_float(scale: torch.Tensor) -> torch.Tensor:
    """float32 powers of two (as `ceil_to_ue8m0` makes them) -> float8_e8m0fnu with the same value, exactly.
    ValueError if a value is not a positive normal power of two, which E8M0 cannot hold."""
    bits = scale.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    bad = (bits & 0x7FFFFF != 0) | (exp == 0) | (exp == 0xFF) | (bits < 0)
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} scale(s) are not positive normal powers of two (first: "
                         f"{float(scale.reshape(-1)[bad.reshape(-1)][0])}); E8M0 holds only 2^e")
    return exp.to(torch.uint8).view(E8M0_DTYPE)


def quantize_mxfp4(x: torch.Tensor, *, scale_rule: str = "ocp", name: str = "tensor"):
    """x [..., K] -> (packed uint8 [..., K/2]; scale E8M0 uint8 [..., K/32])."""
    check_finite(x, name)
    k = x.shape[-1]
    check_divisible(k, MXFP4_BLOCK, "last dim", name)
    xb = x.float().reshape(*x.shape[:-1], k // MXFP4_BLOCK, MXFP4_BLOCK)
    e = mxfp4_scale_exponent(xb.abs().amax(dim=-1), scale_rule)  # [..., K/32]
    scale = (e + E8M0_BIAS).to(torch.uint8)
    codes = round_to_e2m1(xb / e8m0_to_float(scale).unsqueeze(-1)).reshape(x.shape)
    return pack_fp4(codes), scale


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(packed uint8 or int8 [..., K/2], scale E8M0 [..., K/32]) -> dtype [..., K].

    int8 packed bytes and float8_e8m0fnu scales are DeepSeek-V4's routed experts as stored (safetensors I8 and
    F8_E8M0): the same bits as compressed-tensors' uint8, element 2j in the low nibble."""
    values = e2m1_to_float(unpack_fp4(packed.view(torch.uint8) if packed.dtype == torch.int8 else packed))
    k = values.shape[-1]
    vb = values.reshape(*values.shape[:-1], k // MXFP4_BLOCK, MXFP4_BLOCK)
    return (vb * e8m0_to_float(scale).unsqueeze(-1)).reshape(values.shape).to(dtype)
