"""Small-M W4A16 GEMM on weights in the MMA layout (fp4_mma_layout.py): out[M, N] = x[M, K] @ W[N, K]^T.

A decode GEMM (M <= configs.SMALL_M_MAX tokens) is a stream of FP4 weight bytes. This kernel:
- swaps A and B: the decoded weight tile [BLOCK_N, BLOCK_K] is the MMA's A operand, held in registers
  (wgmma takes A from registers), the tokens x^T its N side (16 columns at least);
- loads each thread's share of that operand with one 16-byte load per 16 rows x 64 K, straight into
  registers: to_mma_layout put the bytes where the MMA layout wants them, so the reshape/permute back to
  [BLOCK_N, BLOCK_K] is a renaming of registers, not a trip through shared memory;
- decodes E2M1 x block scale to bf16 with fp4_decode.e2m1_pairs_bf16 (exact), one scale load per lane
  group (the four lanes of a row pair share their scales);
- splits K over CTAs to fill the GPU; the last CTA to finish an output tile sums the fp32 partials in split
  order (one launch, and results that do not depend on timing).
The NVFP4 global scale multiplies the fp32 result before the split sum (as in triton.py's swap-AB kernel).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
from dsquant.kernels.fp4_decode import e2m1_pairs_bf16, e8m0_to_bf16
from dsquant.kernels.gemm import configs
from dsquant.kernels.gemm.fp4_mma_layout import K_ALIGN, ROW_ALIGN, Fp4MmaWeight
from dsquant.kernels.gemm.triton import num_sms, reduce_splits


@triton.jit
def _weight_tile(w_ptr, s_ptr, tn0, tk0, KB, NVFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decoded bf16 weight tile [BLOCK_N, BLOCK_K] from 16-row group tn0 and 64-K block tk0 on (KB blocks per row
    group)."""
    TN: tl.constexpr = BLOCK_N // 16
    TK: tl.constexpr = BLOCK_K // 64
    CG: tl.constexpr = 4 if NVFP4 else 2  # scale groups per 64 K
    CR: tl.constexpr = 4 // CG  # 16-K pieces per scale group
    tn = tn0 + tl.arange(0, TN)
    tk = tk0 + tl.arange(0, TK)
    blk = tn[:, None] * KB + tk[None, :]  # [TN, TK]
    lane = tl.arange(0, 32)
    j = tl.arange(0, 16)
    packed = tl.load(w_ptr + (blk * 512)[:, :, None, None] + (lane * 16)[None, None, :, None] + j[None, None, None, :])
    packed = tl.reshape(packed, (TN, TK, 8, 4, CG, CR, 2, 2))  # tn, tk, l_hi, l_lo, c (= g, r), h, s
    # scales [TN, TK, 8 (l_hi), CG x 2 (h)]: one load of 2 * CG adjacent bytes per lane group (4 or more bytes,
    # so the pipeliner can stage it with cp.async like the codes)
    l_hi = tl.arange(0, 8)
    gh = tl.arange(0, 2 * CG)
    s = tl.load(
        s_ptr + (blk * (16 * CG))[:, :, None, None] + (l_hi * (2 * CG))[None, None, :, None] + gh[None, None, None, :]
    )
    scale = s.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16) if NVFP4 else e8m0_to_bf16(s)
    scale = tl.reshape(scale, (TN, TK, 8, 1, CG, 1, 2, 1))
    even, odd = e2m1_pairs_bf16(packed, tl.broadcast_to(scale, (TN, TK, 8, 4, CG, CR, 2, 2)))
    w = tl.reshape(tl.join(even, odd), (TN, TK, 8, 4, 4, 2, 2, 2))  # ..., c, h, s, nibble
    w = tl.permute(w, (0, 5, 2, 1, 4, 6, 3, 7))  # row (tn, h, l_hi), K (tk, c, s, l_lo, nibble)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _split_part(part_ptr, split, SPLIT_K, M, N, offs_m, offs_n, stride_om):
    """K split `split`'s fp32 partial [BLOCK_M, BLOCK_N] of the output tile at (offs_m, offs_n); zeros past the last."""
    rows = tl.where(split < SPLIT_K, M, 0)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < N)
    ptrs = part_ptr + split * M * stride_om + offs_m[:, None] * stride_om + offs_n[None, :]
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit(do_not_specialize=["M", "KB", "SPLIT_K"])
def _w4a16_mma_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    M,
    N,
    K,
    KB,
    SPLIT_K,
    stride_xm,
    stride_om,
    NVFP4: tl.constexpr,
    FUSED_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    TK: tl.constexpr = BLOCK_K // 64
    k_tiles = tl.cdiv(KB, TK)  # TK divides KB (the layout pads K to K_ALIGN)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * per_split
    k_hi = tl.minimum(k_lo + per_split, k_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for ki in range(k_lo, k_hi):
        kk = ki * BLOCK_K + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0
        )  # [BLOCK_M, BLOCK_K]
        w = _weight_tile(w_ptr, s_ptr, pid_n * (BLOCK_N // 16), ki * TK, KB, NVFP4, BLOCK_N, BLOCK_K)
        acc = tl.dot(w, tl.trans(x), acc)
    out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if NVFP4:
        out = out * tl.load(gs_ptr)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * M * stride_om + offs, out, mask=mask)
        if FUSED_SUM:
            # The CTA that finishes a tile last sums its partials in split order (the same sum whichever CTA
            # that is), then re-arms the tile's counter for the next call. The barrier orders every thread's
            # partial store before the counter's release.
            tl.debug_barrier()
            tile = pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
                # four partials in flight at a time, so one CTA's sum waits on L2 SPLIT_K / 4 times, not SPLIT_K
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(0, SPLIT_K, 4):
                    p0 = _split_part(part_ptr, s, SPLIT_K, M, N, offs_m, offs_n, stride_om)
                    p1 = _split_part(part_ptr, s + 1, SPLIT_K, M, N, offs_m, offs_n, stride_om)
                    p2 = _split_part(part_ptr, s + 2, SPLIT_K, M, N, offs_m, offs_n, stride_om)
                    p3 = _split_part(part_ptr, s + 3, SPLIT_K, M, N, offs_m, offs_n, stride_om)
                    total = (((total + p0) + p1) + p2) + p3
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + tile, 0)


def w4a16_config(m: int, w: Fp4MmaWeight, num_sms: int, block_n: int = 64, block_k: int | None = None,
                 ctas_per_sm: int = configs.W4A16_CTAS_PER_SM, num_stages: int | None = None,
                 min_split_k: int = configs.W4A16_MIN_SPLIT_K) -> dict:
    """Tile and K split for M tokens.

    The K step: NVFP4 128 with 4 stages, MXFP4 256 with 3 (configs.W4A16_TILE: the faster tile per format over
    the DeepSeek shapes). configs.W4A16_CTAS_PER_SM CTAs fit on an SM at once, so the GPU runs `slots` of them
    at a time. Of the K splits that leave no split empty and give each at least min_split_k of K (a shorter
    split spends more on its pipeline's fill and the partial sum than it streams), up to two rounds of slots,
    the one that keeps the most slots busy in its last round wins (the fewest splits among equals): a round of
    a few CTAs streams at a few CTAs' bandwidth while the rest of the GPU idles.
    """
    tile_k, tile_stages = configs.W4A16_TILE["nvfp4" if w.nvfp4 else "mxfp4"]
    block_k = block_k or tile_k
    num_stages = num_stages or tile_stages
    n_tiles = triton.cdiv(w.n, block_n)
    k_tiles = w.k_pad // block_k
    slots = ctas_per_sm * num_sms
    most = min(k_tiles, triton.cdiv(2 * slots, n_tiles), max(1, w.k_pad // max(min_split_k, block_k)))
    splits = sorted({configs.split_k(k_tiles, s) for s in range(1, most + 1)})

    def busy(split: int) -> float:
        ctas = n_tiles * split
        return ctas / (triton.cdiv(ctas, slots) * slots)

    split = max(splits, key=lambda s: (busy(s), -s))
    return dict(
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split,
        num_warps=max(4, block_n // 16),
        num_stages=num_stages,
    )


def compile_sm90(nvfp4: bool = True, cfg: dict | None = None):
    """The kernel with launch parameters cfg (default: M <= 16 on a 64 x 256 tile, 3 stages), compiled for sm_90a on
    any machine (no GPU needed), specialized as a launch on DeepSeek shapes is (16-byte aligned pointers, N, K and
    strides divisible by 16): Triton's CompiledKernel, whose asm["ttgir"] / asm["ptx"] show the layouts and loads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = dict(cfg or dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3))
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    constants = dict(NVFP4=nvfp4, FUSED_SUM=cfg.pop("FUSED_SUM", True), **cfg)
    params = list(inspect.signature(_w4a16_mma_kernel.fn).parameters)
    types = dict(
        x_ptr="*bf16", w_ptr="*u8", s_ptr="*u8", gs_ptr="*fp32", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32"
    )
    signature = {p: "constexpr" if p in constants else types.get(p, "i32") for p in params}
    aligned = [p for p in params if p not in constants and p not in ("M", "KB", "SPLIT_K")]
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in aligned}
    src = ASTSource(_w4a16_mma_kernel, signature, {(params.index(p),): v for p, v in constants.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def w4a16_gemm(
    x: torch.Tensor,
    w: Fp4MmaWeight,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    cfg: dict | None = None,
) -> torch.Tensor:
    """out = x @ W^T for an NVFP4 or MXFP4 weight already in the MMA layout (fp4_mma_layout.to_mma_layout).

    Args:
        x: bfloat16 [M, K], M <= configs.SMALL_M_MAX (larger M: nvfp4_gemm / mxfp4_gemm on the stored layout).
        w: Fp4MmaWeight of K columns, on x's device.
        out: optional preallocated contiguous [M, N] output.
        cfg: launch parameters (benchmarks): BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages.
    Returns:
        out_dtype [M, N].
    """
    assert x.dtype == torch.bfloat16 and x.dim() == 2, f"x must be bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}"
    m, k = x.shape
    assert k == w.k, f"x has K={k}, the weight K={w.k}"
    assert m <= configs.SMALL_M_MAX, f"M={m}: w4a16_gemm serves M <= {configs.SMALL_M_MAX}"
    assert x.device == w.packed.device, f"x on {x.device}, weight on {w.packed.device}"
    x = x if x.stride(1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty((m, w.n), dtype=out_dtype, device=x.device)
    assert tuple(out.shape) == (m, w.n) and out.is_contiguous(), f"out must be contiguous [M, N] = {(m, w.n)}"
    cfg = dict(cfg or w4a16_config(m, w, num_sms(x.device)))
    assert ROW_ALIGN % cfg["BLOCK_N"] == 0 and K_ALIGN % cfg["BLOCK_K"] == 0, f"tile {cfg} does not divide the layout"
    split = cfg.pop("SPLIT_K")
    fused = cfg.pop("FUSED_SUM", True)
    part = out if split == 1 else torch.empty((split, m, w.n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(w.n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
    assert grid[0] * grid[2] <= w.counters.numel(), f"{grid=} has more output tiles than the weight's counters"
    gs = w.global_scale if w.nvfp4 else w.packed  # unread for MXFP4
    _w4a16_mma_kernel[grid](
        x,
        w.packed,
        w.scale,
        gs,
        out,
        part,
        w.counters,
        m,
        w.n,
        k,
        w.packed.shape[1],
        split,
        x.stride(0),
        w.n,
        NVFP4=w.nvfp4,
        FUSED_SUM=fused,
        **cfg,
    )
    if split > 1 and not fused:
        reduce_splits(part, out)
    return out
