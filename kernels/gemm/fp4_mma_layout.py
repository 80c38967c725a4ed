"""FP4 weights rearranged for the small-M W4A16 kernel (triton_w4a16.py): each thread's MMA operand bytes adjacent.

The kernel puts the weight on the MMA's register side (wgmma's A operand: swap-AB, the tokens are the
MMA's N). In that operand each thread of a warp holds, per 16 x 16 (row x K) piece, rows r and r + 8
(r = lane // 4) and K pairs q and q + 4 (q = lane % 4): four bytes of packed E2M1 scattered over two rows.
`to_mma_layout` moves them so that a warp's 16 rows x 64 K are 512 contiguous bytes, 16 per lane, in
the order the lane uses them: one 128-bit load per thread fetches its operand for four 16-K pieces, and
the decoded values are already where the MMA wants them (no pass through shared memory).

Byte order inside a [16 rows, 64 K] block (lane l = 4 * l_hi + l_lo, byte j = 4 * c + 2 * h + s):
row 8 * h + l_hi, K pair 8 * c + 4 * s + l_lo (K = 2 * pair + nibble, low nibble first as stored).
Blocks follow K within a 16-row group: [N / 16, K / 64, 512] bytes.
Scales, per 16-row group and 64-K block, lane group l_hi (the four lanes of a row pair share them):
NVFP4 [8 (l_hi), 4 (16-K group c), 2 (h)] E4M3 bytes, MXFP4 [8, 2 (32-K group), 2] E8M0 bytes.

N is padded to a multiple of ROW_ALIGN and K to K_ALIGN (zero codes with zero scales add nothing).
This is a load-time conversion: the on-disk format (dsquant.formats) is unchanged, `from_mma_layout`
inverts it exactly. The weight also carries the zeroed int32 counters by which the kernel's K splits find the
last one to finish an output tile; each call leaves them zero again, so calls on one weight must be
stream-ordered (one layer's GEMMs are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_ALIGN = 128  # the tallest weight tile the kernel takes
K_ALIGN = 256  # the deepest K step the kernel takes
TOKEN_TILES = 4  # token tiles of 16 rows the kernel may launch (M <= 64)


@dataclass(frozen=True)
class Fp4MmaWeight:
    """An NVFP4 or MXFP4 weight in the kernel's layout, plus what the GEMM needs to know about it."""

    packed: torch.Tensor  # uint8 [N_pad / 16, K_pad / 64, 512]
    scale: torch.Tensor  # uint8 [N_pad / 16, K_pad / 64, 16 * groups per 64 K]
    global_scale: torch.Tensor | None  # NVFP4: float32 [1]; MXFP4: None
    counters: torch.Tensor  # int32 [TOKEN_TILES * N_pad / 16], zero between calls
    n: int
    k: int

    @property
    def nvfp4(self) -> bool:
        return self.global_scale is not None

    @property
    def k_pad(self) -> int:
        return self.packed.shape[1] * 64


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def to_mma_layout(
    w_packed: torch.Tensor, w_scale: torch.Tensor, global_scale: torch.Tensor | None = None
) -> Fp4MmaWeight:
    """dsquant NVFP4 (w_scale float8_e4m3fn [N, K / 16], global_scale float32) or MXFP4 (w_scale uint8 E8M0
    [N, K / 32], global_scale None) weight, packed uint8 [N, K / 2] -> Fp4MmaWeight on the same device."""
    nvfp4 = global_scale is not None
    group = 16 if nvfp4 else 32
    assert w_packed.dtype == torch.uint8 and w_packed.dim() == 2, (
        f"w_packed must be uint8 [N, K/2], got {w_packed.dtype} {tuple(w_packed.shape)}"
    )
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    want = (torch.float8_e4m3fn if nvfp4 else torch.uint8, (n, k // group))
    assert k % group == 0 and (w_scale.dtype, tuple(w_scale.shape)) == want, (
        f"w_scale {w_scale.dtype} {tuple(w_scale.shape)}, expected {want[0]} {want[1]} for w_packed {(n, k // 2)}"
    )
    n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
    k_pad = -(-k // K_ALIGN) * K_ALIGN
    p = _pad(w_packed, n_pad, k_pad // 2)
    # [tn, h, l_hi, tk, c, s, l_lo] -> [tn, tk, l_hi, l_lo, c, h, s]
    p = p.reshape(n_pad // 16, 2, 8, k_pad // 64, 4, 2, 4).permute(0, 3, 2, 6, 4, 1, 5)
    s = _pad(w_scale.view(torch.uint8), n_pad, k_pad // group)
    gpb = 64 // group  # scale groups per 64-K block
    s = s.reshape(n_pad // 16, 2, 8, k_pad // 64, gpb).permute(0, 3, 2, 4, 1)  # [tn, tk, l_hi, g, h]
    return Fp4MmaWeight(
        p.reshape(n_pad // 16, k_pad // 64, 512).contiguous(),
        s.reshape(n_pad // 16, k_pad // 64, 16 * gpb).contiguous(),
        global_scale.reshape(1).float() if nvfp4 else None,
        torch.zeros(TOKEN_TILES * n_pad // 16, dtype=torch.int32, device=w_packed.device),
        n,
        k,
    )


def from_mma_layout(w: Fp4MmaWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of to_mma_layout: (w_packed [N, K / 2], w_scale) in dsquant's layout."""
    tn, tk = w.packed.shape[:2]
    gpb = w.scale.shape[2] // 16
    p = w.packed.reshape(tn, tk, 8, 4, 4, 2, 2).permute(0, 5, 2, 1, 4, 6, 3).reshape(tn * 16, tk * 32)
    s = w.scale.reshape(tn, tk, 8, gpb, 2).permute(0, 4, 2, 1, 3).reshape(tn * 16, tk * gpb)
    s = s[: w.n, : w.k * gpb // 64].contiguous()
    return p[: w.n, : w.k // 2].contiguous(), s.view(torch.float8_e4m3fn) if w.nvfp4 else s
