"""The order in which a GEMM-like kernel's programs walk their output tiles (inlined by Triton).

GEMM and the fused MoE GEMMs share it: consecutive programs take GROUP_M row tiles at a time, so a wave of
programs reads the same weight tiles (and, in the MoE kernels, one expert's weights) while they are in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n), GROUP_M row tiles at a time, each group walking its rows fastest."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile_id // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % size_m, (tile_id % in_group) // size_m
