"""Tile configurations for the GEMM kernels in triton.py, kept beside them and keyed on static dims.

Large M (the persistent kernel): a short autotune list per weight format, keyed on (N, K, format,
M bucket) so a new sequence length does not re-tune; pruned by shared memory and by M.
Small M (the swap-AB split-K kernel): a fixed heuristic, since the work is a weight stream whose
best split only depends on how many tiles N gives and how many SMs there are.
"""

from __future__ import annotations

import os

import triton
from dsquant.kernels import format_codes

FP4_FORMATS = (format_codes.NVFP4, format_codes.MXFP4)  # decoded to bf16 (W4A16)
PACKED_FORMATS = (format_codes.NVFP4, format_codes.MXFP4, format_codes.MXFP4_W4A8)  # two E2M1 codes per stored byte
# mxfp4_gemm takes the FP8 tensor-core path (W4A8) from this M on. Both paths are bound by the in-register
# E2M1 decode (BLOCK_N x BLOCK_K values per k-step on the CUDA cores), so W4A8's faster MMA only pays once
# M amortizes its activation quantization: W4A8 is slower up to M = 4096 on the DeepSeek shapes
# (benchmarks/results/gemm_h100.csv, gemm_h100_fp4.csv) and its time ratio to W4A16 falls toward 1 near 8K rows.
W4A8_MIN_M = 8192

# fp8_block_gemm runs the warp-specialized Gluon kernel (gluon_fp8.py) on Hopper from this M on, where it was
# measured near cuBLAS block-scaled _scaled_mm and about twice the Triton kernel
# (benchmarks/results/gemm_fp8_gluon_anchor_h100.csv); below it the Triton kernels stay.
GLUON_MIN_M = 2048
SMALL_M_MAX = 64  # M <= this takes the swap-AB split-K kernel (weights stream once, MMA N = BLOCK_M)
# CTAs of the small-M W4A16 kernel (triton_w4a16.py, 64 x 256 tile, 3 stages) that fit on an SM at once:
# ptxas gives it about 110 registers a thread at 128 threads, and it takes 43 KB of shared memory.
W4A16_CTAS_PER_SM = 4
# Its K step and pipeline depth per format, and the least K a split takes: the fastest of the H100 launch
# sweep over the DeepSeek shapes at M <= 16 (benchmarks/results/gemm_w4a16_sweep_h100.csv, where "heur" is the
# earlier 256-K rule). NVFP4's 128-wide step (eight 16-value scale groups) beat 256 on every shape but
# 576 x 7168, where the split rule gave it one 128-K step per CTA; MXFP4 kept 256. Splits of fewer than 1024 K
# lost wherever the split rule chose them (576 x 7168, 2112 x 7168, 4096 x 7168, 7168 x 2048).
W4A16_TILE = {"nvfp4": (128, 4), "mxfp4": (256, 3)}
W4A16_MIN_SPLIT_K = 1024
SMEM_BYTES = 227 * 1024  # H100/H200 dynamic shared memory per block


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tune_bench(fn, quantiles):
    """Autotune timing: short runs, since each (N, K) is tuned once per process and DeepSeek has a handful."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def m_bucket(m: int) -> int:
    """Autotune key for M: one config for prefill-sized M, one for the M in between."""
    return 0 if m <= 512 else 1


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps, num_stages=stages)


# FP8 block scaling pins BLOCK_K to the 128-wide scale group; INT8 shares the list.
_LARGE_M_8BIT = [
    _cfg(128, 128, 128, 4, 4),
    _cfg(128, 128, 128, 8, 4),
    _cfg(128, 256, 128, 8, 3),
    _cfg(256, 128, 128, 8, 3),
    _cfg(64, 128, 128, 4, 5),
]
# FP4 weights: bf16 activations (2 bytes per K) against packed weights (1/2 byte per K).
# 256-row tiles decode each weight tile once for twice the rows (the decode, not the MMA, bounds these tiles).
_LARGE_M_FP4 = [
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(64, 128, 128, 4, 4),
    _cfg(256, 128, 64, 8, 3),
    _cfg(256, 128, 64, 8, 4),
]


def large_m_configs(fmt: int) -> list:
    """The autotune list of the persistent kernel for one weight format."""
    return _LARGE_M_FP4 if fmt in FP4_FORMATS else _LARGE_M_8BIT


def interpreter_config(fmt: int) -> dict:
    """The interpreter cannot time configs, so it runs the first one: any valid config checks the arithmetic."""
    cfg = large_m_configs(fmt)[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _smem(cfg: triton.Config, a_bytes: float, b_bytes: float) -> float:
    k = cfg.kwargs
    return cfg.num_stages * k["BLOCK_K"] * (k["BLOCK_M"] * a_bytes + k["BLOCK_N"] * b_bytes)


def early_prune(configs, named_args, **kwargs):
    """Autotune pruning: configs fitting shared memory, and no taller than M needs."""
    a_bytes = 2 if kwargs["W_FMT"] in FP4_FORMATS else 1
    b_bytes = 0.5 if kwargs["W_FMT"] in PACKED_FORMATS else 1
    keep = [c for c in configs if _smem(c, a_bytes, b_bytes) <= SMEM_BYTES]
    if named_args["M"] <= 128:
        keep = [c for c in keep if c.kwargs["BLOCK_M"] <= 128] or keep
    return keep


def split_k(k_tiles: int, want: int) -> int:
    """About `want` K splits of k_tiles steps, at least one, and none left empty."""
    split = max(1, min(k_tiles, want))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def small_m_config(m: int, n: int, k: int, fmt: int, num_sms: int) -> dict:
    """Swap-AB split-K launch parameters for M <= SMALL_M_MAX.

    The weight tile is the MMA's M side (BLOCK_N rows), the tokens its N side (BLOCK_M >= 16).
    K is split so that about two CTAs per SM stream weights; the splits are summed by a second,
    deterministic kernel.
    """
    block_m = max(16, triton.next_power_of_2(m))
    # FP4 tiles are decoded in registers (fp32 values before the bf16 cast): 64 x 128 keeps that at
    # 64 values per thread for 4 warps.
    block_n = 64 if fmt in FP4_FORMATS else 128
    block_k = 128
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = split_k(k_tiles, round(2 * num_sms / n_tiles))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=4)
