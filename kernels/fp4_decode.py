"""E2M1 (FP4) weight decode for the Hopper kernels that dequantize in registers (W4A16 GEMM, fused MoE).

Hopper has no FP4 instruction, so a packed byte (two E2M1 codes, element 2i in the low nibble) becomes
two bf16 values in software, each times its block scale. That decode is the cost of a weight-streaming
FP4 kernel: it runs once per weight element, while the MMA sees 16 activation rows at most.

On the GPU one PTX block decodes four bytes (eight codes):
  - `prmt` is a byte table lookup: with the 3-bit magnitude of each code as its selector, one `prmt`
    picks the high bytes and one the low bytes of the bf16 values of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (two
    32-bit registers hold each 8-entry table), and two more `prmt`s pair them into bf16x2 words;
  - the code's sign bit is moved onto bit 15 of its half with one shift and one AND-OR;
  - `mul.rn.bf16x2` applies the block scale to two values at once. E2M1 x E4M3 needs at most
    2 + 4 significant bits and E2M1 x 2^e one, so the bf16 product is exact (bf16 keeps subnormals).
About 2.75 instructions per weight element, against 12 for the float32 decode below.
The Triton interpreter cannot run PTX, so under TRITON_INTERPRET=1 the same function takes the float32
path: the code bits placed at float32 bits 24..22 read as E2M1 x 2^-126 (subnormals included) and one
exact multiply by 2^126. Both paths give the same bits; tests/kernels/test_fp4_decode.py checks every
byte value against dsquant.formats on CPU (float32 path) and on the GPU (PTX path).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_USE_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
_TWO_POW_126 = tl.constexpr(2.0**126)


def _decode_2_bytes(first: int) -> str:
    """PTX for bytes `first` and `first` + 1 of $4 (m holds their magnitudes in its low 16 bits): the low-nibble
    values into output $first, the high-nibble values into $(first + 2), each times the scales in $(5 + first)."""
    spread = ("0x1404", "0x3424")[first]  # [0, byte, 0, byte + 1]: the sign bits of the low nibbles at 11 and 27
    return f"""prmt.b32 h, th0, th1, m;
prmt.b32 l, tl0, tl1, m;
prmt.b32 e, l, h, 0x6240;
prmt.b32 o, l, h, 0x7351;
prmt.b32 y, $4, z, {spread};
shl.b32 sg, y, 4;
and.b32 sg, sg, 0x80008000;
or.b32 e, e, sg;
and.b32 sg, y, 0x80008000;
or.b32 o, o, sg;
mul.rn.bf16x2 ${first}, e, ${5 + first};
mul.rn.bf16x2 ${first + 2}, o, ${5 + first};
"""


# Inputs $4 (four packed bytes, byte j = element j) and $5, $6 (bf16 scales of bytes 0-1 and 2-3).
# Outputs $0, $1 (low-nibble values of bytes 0-1, 2-3) and $2, $3 (high-nibble values), bf16x2 each.
# Tables: th0 / th1 hold the high bytes, tl0 / tl1 the low bytes of the bf16 values of magnitudes 0..7.
_DECODE_4_BYTES = tl.constexpr(f"""
{{
.reg .b32 th0, th1, tl0, tl1, z, m, h, l, y, e, o, sg;
mov.b32 th0, 0x3F3F3F00;
mov.b32 th1, 0x40404040;
mov.b32 tl0, 0xC0800000;
mov.b32 tl1, 0xC0804000;
mov.b32 z, 0;
and.b32 m, $4, 0x77777777;
{_decode_2_bytes(0)}shr.b32 m, m, 16;
{_decode_2_bytes(1)}}}
""")


@triton.jit
def e2m1_float32(codes):
    """int32 codes 0..15 -> float32 E2M1 values, exact (bits at 24..22 read as value x 2^-126, times 2^126)."""
    bits = ((codes & 7) << 22) | ((codes & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def e2m1_pairs_bf16(packed, scale):
    """Packed E2M1 bytes x per-byte scales -> (low-nibble values, high-nibble values), bf16, exact.

    Args:
        packed: uint8 tensor, two codes per byte (element 2i in the low nibble).
        scale: bf16 tensor of packed's shape: the block scale of each byte's two codes (E4M3 or E8M0
            values are exact in bf16; a scale past bf16's range gives the same Inf the float32 product would).
    Returns:
        (even, odd) bf16 tensors of packed's shape: even[..., j] is code 2j times its scale, odd[..., j] code 2j+1.
    """
    if _USE_PTX:
        even, odd = tl.inline_asm_elementwise(
            _DECODE_4_BYTES, "=r,=r,=r,=r,r,r,r", [packed, scale], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=4,
        )
    else:
        p = packed.to(tl.int32)
        s = scale.to(tl.float32)
        even = (e2m1_float32(p & 0xF) * s).to(tl.bfloat16)
        odd = (e2m1_float32(p >> 4) * s).to(tl.bfloat16)
    return even, odd


@triton.jit
def e2m1_groups_bf16(packed, scale, GROUP: tl.constexpr):
    """Packed E2M1 rows [R, C] with one bf16 scale per GROUP codes ([R, 2C / GROUP]) -> (even, odd) bf16 [R, C]:
    each scale repeated over its GROUP / 2 bytes, then e2m1_pairs_bf16."""
    R: tl.constexpr = packed.shape[0]
    C: tl.constexpr = packed.shape[1]
    per_byte = tl.reshape(tl.broadcast_to(scale[:, :, None], (R, 2 * C // GROUP, GROUP // 2)), (R, C))
    return e2m1_pairs_bf16(packed, per_byte)


@triton.jit
def e8m0_to_bf16(b):
    """E8M0 bytes (uint8) -> bf16 2^(b - 127) by its bits, exact; b = 0 is the bf16 subnormal 2^-127, and 255 is
    NaN as the MX format defines it (its exponent bits alone would read as Inf, and a block scaled by Inf would
    decode to +-Inf instead of NaN, unlike formats.mxfp4.e8m0_to_float)."""
    e = b.to(tl.int16)
    bits = tl.where(e > 0, e << 7, 0x40)
    return tl.where(e == 255, 0x7FC0, bits).to(tl.bfloat16, bitcast=True)
