"""FP8 (E4M3) scale and cast inside Triton kernels, with dsquant.formats.fp8's numbers bit for bit (inlined by Triton).

The quantizers (kernels.quant) and the MoE kernels' in-kernel activation quantization share them, so an
activation quantized inside a fused kernel has the codes and scales that quantize_fp8_per_token_group gives.
"""

from __future__ import annotations

import triton
import triton.language as tl
from dsquant.kernels.exact_div import divide

from dsquant.formats.fp8 import FP8_AMAX_FLOOR, FP8_E4M3_MAX

_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
_FP8_FLOOR = tl.constexpr(FP8_AMAX_FLOOR)


@triton.jit
def fp8_scale(amax, UE8M0: tl.constexpr):
    """float32 group amax -> float32 scale: max(amax, 1e-4) / 448, optionally rounded up to 2^n by its bits."""
    scale = tl.div_rn(tl.maximum(amax, _FP8_FLOOR), _FP8_MAX)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exp << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def cast_fp8(x, scale, rcp, FAST_DIV: tl.constexpr):
    """clamp(x / scale, -448, 448) -> e4m3, rcp = tl.div_rn(1.0, scale): the float32 -> e4m3 cast is
    cvt.rn.satfinite, which clamps to +-448 itself (and the interpreter fix mirrors it), so the clamp costs no
    instructions here. Codes depend on the quotient only where |x / scale| >= 2^-10 (below, e4m3 keeps just the
    sign of x)."""
    return divide(x, scale, rcp, FAST_DIV).to(tl.float8e4nv)
