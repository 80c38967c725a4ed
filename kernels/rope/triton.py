"""DeepSeek interleaved RoPE in place from a cos/sin cache, in Triton (spec: reference.py).

One program per token rotates every head of q_pe and the token's k_pe. The rotation is two products
and a sum in float32 per element; the GPU may contract them into an FMA, so results agree with the
reference to float32 rounding (exactly under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_qt, stride_qh, stride_kt, stride_c, H,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_c + i)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + i)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < H) & (i[None, :] < HALF)
    q = q_ptr + t * stride_qt + h * stride_qh + 2 * i[None, :]
    qe = tl.load(q, mask=mask).to(tl.float32)
    qo = tl.load(q + 1, mask=mask).to(tl.float32)
    tl.store(q, (qe * c - qo * s).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(q + 1, (qe * s + qo * c).to(q_ptr.dtype.element_ty), mask=mask)
    k = k_ptr + t * stride_kt + 2 * i[None, :]
    ke = tl.load(k).to(tl.float32)
    ko = tl.load(k + 1).to(tl.float32)
    tl.store(k, (ke * c - ko * s).to(k_ptr.dtype.element_ty))
    tl.store(k + 1, (ke * s + ko * c).to(k_ptr.dtype.element_ty))


def apply_rope(
    q_pe: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> None:
    """Rotate in place. q_pe [T, H, R] and k_pe [T, R] (last dim contiguous; views are fine),
    cos/sin float32 [P, R/2] contiguous, positions int [T] (each < P)."""
    t, h, r = q_pe.shape
    assert k_pe.shape == (t, r), f"k_pe {tuple(k_pe.shape)} vs q_pe {tuple(q_pe.shape)}"
    assert q_pe.stride(-1) == 1 and k_pe.stride(-1) == 1, "the rope dim must be contiguous"
    assert r % 2 == 0 and (r // 2) & (r // 2 - 1) == 0, f"rope dim {r}: R/2 must be a power of two"
    assert cos.shape == sin.shape and cos.shape[1] == r // 2 and cos.is_contiguous() and sin.is_contiguous()
    assert cos.dtype == torch.float32 and positions.shape == (t,), f"positions {tuple(positions.shape)}"
    if t:
        _apply_rope_kernel[(t,)](
            q_pe, k_pe, cos, sin, positions, q_pe.stride(0), q_pe.stride(1), k_pe.stride(0), cos.stride(0), h,
            HALF=r // 2, BLOCK_H=triton.next_power_of_2(h), num_warps=4,
        )  # fmt: skip
