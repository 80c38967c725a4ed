"""Launch configurations of the MLA attend kernel: tile sizes, the fp8 tile schedule, the defaults and the
static split-count heuristic (no GPU needed to import)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
from dsquant.kernels.mla.cache import KV_LORA_RANK, kv_cache_bytes_per_token

TILE_CODE = {"regs": 0, "reload": 1, "smem": 2, "dequant": 3, "smem16": 4, "tokens": 5, "gluon": 6}
TILE_TAG = {"regs": "", "reload": "r", "smem": "m", "dequant": "d", "smem16": "m16", "tokens": "t", "gluon": "g"}


class AttendConfig(NamedTuple):
    """Tile sizes and launch parameters of mla_attend_kernel."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    # fp8 caches, how the tile reaches the two dots: "regs" each dot converts its own register copy (P.V's
    # 8-bit operand gathered byte by byte), "reload" each dot reads the tile from global memory (second read
    # from L2), "smem" one float16 tile in shared memory feeds both (ldmatrix), all three on float16 MMAs;
    # "dequant" bf16 tiles (fp8_ds: codes times group scale, rounded to bf16) on bf16 MMAs; "smem16" as "smem"
    # with 16-bit operand layouts (ldmatrix; tiles.load_kv_chunk); "tokens" the token-major kernel
    # (token_major.py: tokens as the MMA rows, block_n of them, heads as its columns); "gluon" its Gluon
    # kernel for Hopper decode (gluon_decode.py: 16 heads, 64 tokens, each code converted once into shared
    # memory), elsewhere and for prefill the portable config (portable_config). bf16 caches ignore it (their
    # tile is read once into shared memory by the pipeliner).
    tile: str = "regs"

    def __str__(self) -> str:
        return f"h{self.block_h}n{self.block_n}w{self.num_warps}s{self.num_stages}" + TILE_TAG[self.tile]


# performance hyper-parameters: the fastest configs of the H100 sweep at batch 64, 4K context
# (benchmarks/results/mla_h100.csv; <= 16-head fp8_ds: mla_h100_smem16.csv). <= 16 heads is memory-bound:
# 16-row head blocks on mma.sync. bf16: 64-token tiles read once into shared memory. fp8: float16 MMAs on
# 32-token tiles read twice ("reload"), which beats one shared float16 tile; fp8_ds: one float16 shared tile
# pinned for 16-bit ldmatrix ("smem16"). More heads: 64-row head blocks for wgmma and 64-token tiles; fp8
# there shares one float16 tile ("smem"), while fp8_ds dequantizes to bf16 ("dequant"), since the float16
# path's per-chunk scales spill at 64 rows (benchmarks/results/mla_sm90_sass.csv). 32 heads pad to a 64-row
# block, which takes wgmma.
def portable_config(num_heads: int, kind: str) -> AttendConfig:
    if kind == "bf16":
        return AttendConfig(16, 64, 8, 3) if num_heads <= 16 else AttendConfig(64, 64, 8, 2)
    if num_heads <= 16:
        return AttendConfig(16, 32, 4, 3, "reload") if kind == "fp8" else AttendConfig(16, 32, 4, 3, "smem16")
    return AttendConfig(64, 64, 8, 2, "smem" if kind == "fp8" else "dequant")


# The Gluon decode kernel's tile (gluon_decode.py: BLOCK_H heads, BLOCK_N tokens, the MMA warpgroup plus an
# 8-warp converter), the default for fp8 caches at <= 16 heads on Hopper, where it beats the portable config
# (benchmarks/results/mla_fp8_h100.csv); for fp8_ds it trails smem16 slightly, so the portable config stays.
# Elsewhere and for prefill the portable config runs.
GLUON_CONFIG = AttendConfig(16, 64, 8, 2, "gluon")


def programs_per_sm(cfg: AttendConfig) -> int:
    """Programs of this config an SM holds at once: the Gluon kernel's two float16 tiles take most of its shared
    memory; a 16-row head block is small enough (<= 128 registers, < 100 KB shared) for 2."""
    if cfg.tile == "gluon":
        return 1
    return 2 if cfg.block_h <= 16 else 1


def default_config(num_heads: int, kind: str) -> AttendConfig:
    if kind == "fp8" and num_heads <= 16:
        return GLUON_CONFIG
    return portable_config(num_heads, kind)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def default_num_splits(rows: int, num_heads: int, max_kv: int, kind: str, block_h: int, n_sms: int,
                       per_sm: int | None = None) -> int:
    """Splits per row minimising KV time / wave fill + partial-output traffic (static sizes only).

    Every row is assumed to use the block table's full capacity `max_kv`; a split is worth its
    float32 partial output (written and read back) only while programs do not fill the SMs. per_sm: programs
    an SM holds at once (programs_per_sm; by default that of a portable config with block_h heads).
    """
    slots = n_sms * (per_sm or (2 if block_h <= 16 else 1))
    base = rows * triton.cdiv(num_heads, block_h)
    kv_bytes = rows * max_kv * kv_cache_bytes_per_token(kind)
    best, best_cost = 1, float("inf")
    for splits in range(1, 65):
        if splits > 1 and max_kv < 256 * splits:
            break
        programs = base * splits
        fill = programs / (math.ceil(programs / slots) * slots)
        partial = 0 if splits == 1 else 2 * rows * num_heads * splits * (KV_LORA_RANK + 1) * 4
        cost = kv_bytes / fill + partial
        if cost < best_cost * 0.98:  # a split must win clearly to be worth it
            best, best_cost = splits, cost
    return best
