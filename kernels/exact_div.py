"""Correctly rounded float32 divisions for the quantizers (inlined by Triton), cheaper than tl.div_rn per element.

A code agrees with the torch spec only if its quotient is the correctly rounded x / d: Triton's `/` on
float32 lowers to div.full.f32 (up to 2 ulp off) and x * (1 / d) is off by an ulp as often as not; either
moves values that sit exactly on a rounding midpoint. tl.div_rn is exact but costs about twenty
instructions and a branch per element; the divisions here give its bits where their callers need them.
"""

from __future__ import annotations

import triton
import triton.language as tl

_SIGN_BIT = tl.constexpr(-(2**31))  # 0x80000000 as int32


@triton.jit
def div_rn_shared_unsigned(x, d, r):
    """div_rn_shared(x, d, r) without its sign fix-up: x = -0.0 gives +0.0, and r = 0 (with d = 1) gives +-0.

    For the E2M1 codes, where both are code 0 as in the spec, so zero-scale blocks need no select."""
    q0 = x * r
    return tl.fma(tl.fma(-q0, d, x), r, q0)


@triton.jit
def div_rn_shared(x, d, r):
    """tl.div_rn(x, d) for a divisor d shared by many x, given its reciprocal r = tl.div_rn(1.0, d).

    The correction step of the fast path of div.rn.f32 itself (Markstein): q0 = x * r, e = x - d * q0
    (exact in one fma), q = q0 + e * r rounds once to the correctly rounded quotient. Three FMA-pipe
    instructions per element instead of div.rn's eleven and a branch; r costs one division per group.
    Valid where div.rn's own fast path is: normal d with 1/d normal and no overflow of x * r; the FP8
    and INT8 scales guarantee it (floored amax, |x / scale| <= 448 or 127). tests/kernels/test_quant_gpu.py
    checks it against div.rn.f32 on random and hard pairs.
    Quotients that fall into the float32 subnormal range may differ from div.rn in the last place; every
    caller maps those to a zero code. The sign of x is copied onto the result (one LOP3): it is q's sign
    anyway except for x = -0, where the fma sum gives +0 and div.rn gives -0.
    """
    q = div_rn_shared_unsigned(x, d, r)
    return (q.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & _SIGN_BIT)).to(tl.float32, bitcast=True)


@triton.jit
def divide(x, d, r, FAST_DIV: tl.constexpr):
    """x / d correctly rounded: div_rn_shared with the reciprocal r (FAST_DIV), else tl.div_rn."""
    if FAST_DIV:
        return div_rn_shared(x, d, r)
    else:
        return tl.div_rn(x, d)


@triton.jit
def silu_div(gate, d, NATIVE: tl.constexpr, FAST_DIV: tl.constexpr):
    """gate / d correctly rounded for d = 1 + exp(-gate) >= 1. FAST_DIV: the fast path of div.rn.f32 itself, without
    its range check (FCHK) and slow-path branch: r = rcp(d) refined by one Newton step, q0 = gate * r and one
    Markstein correction; 7 instructions instead of ~18. Exact where that check would pass: d < 2^126 (the
    caller sends gate < -85 to tl.div_rn), and for |gate| < 2^-25, where d = 2 and every step is exact. The
    sign of gate is copied: the fma sum turns -0 / d into +0, div.rn keeps -0. tests/kernels/test_quant_gpu.py
    checks it against torch's silu on every bf16 gate."""
    if FAST_DIV:
        if NATIVE:  # MUFU.RCP, div.rn's first step (Triton's 1.0 / d would add range scaling: 9 instructions)
            r0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32,
                                           is_pure=True, pack=1)
        else:  # the interpreter runs no PTX; a correctly rounded start gives the same quotient
            r0 = 1.0 / d
        r = tl.fma(tl.fma(-d, r0, 1.0), r0, r0)
        q0 = gate * r
        q = tl.fma(tl.fma(-d, q0, gate), r, q0)
        sign = gate.to(tl.int32, bitcast=True) & _SIGN_BIT
        return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    else:
        return tl.div_rn(gate, d)
