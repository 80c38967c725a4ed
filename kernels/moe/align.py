"""Token/expert alignment (vLLM `moe_align_block_size`) in Triton, deterministic, no host sync.

Up to SINGLE_MAX slots (decode), one program does everything (_align_single_kernel). Beyond, the T*k routed slots
are cut into chunks of CHUNK slots and three kernels run:
    1. count:   per chunk histogram [NC, E]; the same programs fill sorted_token_ids with the sentinel.
    2. scan:    one program, expert tile by expert tile: exclusive prefix over chunks (per expert) and over
                padded experts, giving each (chunk, expert) its first output row, each expert its first block,
                and the padded total.
    3. scatter: per chunk, a slot's row = its (chunk, expert) row + its rank among the chunk's earlier slots of the
                same expert, so slots stay in ascending order within an expert; expert_ids per block.
The grid depends on T only (sizes from reference.align_sizes), so the call is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsquant.kernels.moe.reference import align_sizes


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, sorted_ptr, numel, num_experts, rows, fill_per_prog,
                        CHUNK: tl.constexpr, E_PAD: tl.constexpr, FILL_BLOCK: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    m = offs < numel
    ids = tl.load(ids_ptr + offs, mask=m, other=0)
    hist = tl.histogram(ids, E_PAD, mask=m)  # [E_PAD] int32
    e = tl.arange(0, E_PAD)
    tl.store(counts_ptr + c * num_experts + e, hist, mask=e < num_experts)
    start = c * fill_per_prog
    for f in range(0, fill_per_prog, FILL_BLOCK):
        r = start + f + tl.arange(0, FILL_BLOCK)
        in_part = f + tl.arange(0, FILL_BLOCK) < fill_per_prog
        tl.store(sorted_ptr + r, tl.full([FILL_BLOCK], numel, tl.int32), mask=(r < rows) & in_part)


@triton.jit
def _align_scan_kernel(counts_ptr, chunk_row_ptr, block_start_ptr, total_ptr, n_chunks, num_experts,
                       BLOCK_M: tl.constexpr, NC_PAD: tl.constexpr, E_TILE: tl.constexpr):
    c = tl.arange(0, NC_PAD)
    carry = tl.zeros([], dtype=tl.int32)
    for e0 in range(0, num_experts, E_TILE):
        e = e0 + tl.arange(0, E_TILE)
        msk = (c[:, None] < n_chunks) & (e[None, :] < num_experts)
        cnt = tl.load(counts_ptr + c[:, None] * num_experts + e[None, :], mask=msk, other=0)  # [NC_PAD, E_TILE]
        before = tl.cumsum(cnt, 0) - cnt  # this expert's slots in earlier chunks
        padded = (tl.sum(cnt, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_TILE]
        first_row = carry + tl.cumsum(padded, 0) - padded
        tl.store(chunk_row_ptr + c[:, None] * num_experts + e[None, :], first_row[None, :] + before, mask=msk)
        tl.store(block_start_ptr + e, first_row // BLOCK_M, mask=e < num_experts)
        carry += tl.sum(padded, 0)
    tl.store(block_start_ptr + num_experts, carry // BLOCK_M)
    tl.store(total_ptr, carry)


@triton.jit
def _align_scatter_kernel(ids_ptr, chunk_row_ptr, sorted_ptr, block_start_ptr, expert_ids_ptr,
                          numel, num_experts, n_blocks, blocks_per_prog,
                          CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr, B_TILE: tl.constexpr):
    c = tl.program_id(0)
    loc = tl.arange(0, CHUNK)
    m = c * CHUNK + loc < numel
    ids = tl.load(ids_ptr + c * CHUNK + loc, mask=m, other=-1)
    rank = tl.zeros([CHUNK], dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):  # rank = earlier slots of this chunk with the same expert
        sl = s0 + tl.arange(0, SUB)
        other = tl.load(ids_ptr + c * CHUNK + sl, mask=c * CHUNK + sl < numel, other=-2)
        same = (ids[:, None] == other[None, :]) & (sl[None, :] < loc[:, None])
        rank += tl.sum(same.to(tl.int32), 1)
    row = tl.load(chunk_row_ptr + c * num_experts + ids, mask=m, other=0) + rank
    tl.store(sorted_ptr + row, c * CHUNK + loc, mask=m)

    e = tl.arange(0, E_PAD)
    starts = tl.load(block_start_ptr + e, mask=e < num_experts, other=2147483647)  # [E_PAD] non-decreasing
    used = tl.load(block_start_ptr + num_experts)
    for b0 in range(0, blocks_per_prog, B_TILE):
        b = c * blocks_per_prog + b0 + tl.arange(0, B_TILE)
        # the owner of block b is the last expert starting at or before b (empty experts share the next start)
        owner = tl.sum((starts[None, :] <= b[:, None]).to(tl.int32), 1) - 1
        owner = tl.where(b < used, owner, -1)
        tl.store(expert_ids_ptr + b, owner, mask=(b < n_blocks) & (b0 + tl.arange(0, B_TILE) < blocks_per_prog))


@triton.jit
def _align_single_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, numel, num_experts, rows, n_blocks,
                         BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr,
                         PAD_TILE: tl.constexpr, FILL_BLOCK: tl.constexpr, B_TILE: tl.constexpr):
    """All three steps in one program for few slots (decode): one launch instead of three. Each output row is
    written once (slots, then the sentinel into the padding rows only), so no ordering between threads is needed."""
    e = tl.arange(0, E_PAD)
    loc = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, numel, CHUNK):
        m = c0 + loc < numel
        counts += tl.histogram(tl.load(ids_ptr + c0 + loc, mask=m, other=0), E_PAD, mask=m)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    first_row = tl.cumsum(padded, 0) - padded  # [E_PAD]
    total = tl.sum(padded, 0)
    seen = tl.zeros([E_PAD], dtype=tl.int32)  # slots of each expert in earlier chunks
    for c0 in range(0, numel, CHUNK):
        m = c0 + loc < numel
        ids = tl.load(ids_ptr + c0 + loc, mask=m, other=0)
        rank = tl.zeros([CHUNK], dtype=tl.int32)
        for s0 in range(0, CHUNK, SUB):
            sl = s0 + tl.arange(0, SUB)
            other = tl.load(ids_ptr + c0 + sl, mask=c0 + sl < numel, other=-1)
            rank += tl.sum(((ids[:, None] == other[None, :]) & (sl[None, :] < loc[:, None])).to(tl.int32), 1)
        tl.store(sorted_ptr + tl.gather(first_row + seen, ids, 0) + rank, c0 + loc, mask=m)
        seen += tl.histogram(ids, E_PAD, mask=m)
    for j0 in range(0, BLOCK_M, PAD_TILE):  # the sentinel into each expert's padding rows
        j = j0 + tl.arange(0, PAD_TILE)
        r = (first_row + counts)[:, None] + j[None, :]
        pad = j[None, :] < (padded - counts)[:, None]
        tl.store(sorted_ptr + r, tl.full([E_PAD, PAD_TILE], numel, tl.int32), mask=pad)
    for r0 in range(total, rows, FILL_BLOCK):  # and into the rows past the total
        r = r0 + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ptr + r, tl.full([FILL_BLOCK], numel, tl.int32), mask=r < rows)
    starts = tl.where(e < num_experts, first_row // BLOCK_M, 2147483647)
    for b0 in range(0, n_blocks, B_TILE):  # the owner of a block: the last expert starting at or before it
        b = b0 + tl.arange(0, B_TILE)
        owner = tl.sum((starts[None, :] <= b[:, None]).to(tl.int32), 1) - 1
        tl.store(expert_ids_ptr + b, tl.where(b < total // BLOCK_M, owner, -1), mask=b < n_blocks)
    tl.store(total_ptr, total)


# performance hyper-parameters. Chunks stay at 128 slots: wider chunks make the [CHUNK, SUB] rank compare outgrow
# the registers (the scatter kernel spills from 256-slot chunks on, benchmarks/results/moe_sm90_ptxas.csv) and run
# several times slower (benchmarks/results/moe_h100.csv). The scan tile stays near 8K elements by narrowing its
# expert tile as the chunk count grows; the one-program scan runs on 8 warps, where no variant spills. The
# single-program path saves two launches, but its rank compare runs in one program, so it wins only up to 128 slots.
CHUNK = 128
SCAN_TILE_ELEMS = 8192
SINGLE_MAX = 128  # up to this many slots (16 tokens at top-8) one program does all


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group routed slots by expert, padded to block_m rows per expert (spec: moe_align_ref).

    Args:
        topk_ids: int32 [T, k], contiguous, values in [0, num_experts).
        num_experts: E. block_m: the grouped GEMM's BLOCK_M.
    Returns:
        sorted_token_ids int32 [R] (flat slot t*k + j, padding = T*k), expert_ids int32 [R / block_m] (-1 past
        the end), num_tokens_post_padded int32 [1], with R = align_sizes(T*k, E, block_m)[0].
    """
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous(), f"topk_ids: {topk_ids.dtype}, want int32"
    assert num_experts >= 1 and block_m >= 1, f"{num_experts=} {block_m=}"
    numel = topk_ids.numel()
    dev = topk_ids.device
    rows, n_blocks = align_sizes(numel, num_experts, block_m)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    if numel == 0:
        return sorted_ids, expert_ids, total.zero_()
    e_pad = triton.next_power_of_2(num_experts)
    if numel <= SINGLE_MAX:
        _align_single_kernel[(1,)](topk_ids, sorted_ids, expert_ids, total, numel, num_experts, rows, n_blocks,
                                   BLOCK_M=block_m, CHUNK=CHUNK, SUB=64, E_PAD=e_pad, PAD_TILE=16, FILL_BLOCK=1024,
                                   B_TILE=64, num_warps=8)
        return sorted_ids, expert_ids, total
    n_chunks = -(-numel // CHUNK)
    nc_pad = max(triton.next_power_of_2(n_chunks), 2)
    counts = torch.empty((n_chunks, num_experts), dtype=torch.int32, device=dev)
    chunk_row = torch.empty((n_chunks, num_experts), dtype=torch.int32, device=dev)
    block_start = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    _align_count_kernel[(n_chunks,)](topk_ids, counts, sorted_ids, numel, num_experts, rows, -(-rows // n_chunks),
                                     CHUNK=CHUNK, E_PAD=e_pad, FILL_BLOCK=1024, num_warps=4)
    _align_scan_kernel[(1,)](counts, chunk_row, block_start, total, n_chunks, num_experts, BLOCK_M=block_m,
                             NC_PAD=nc_pad, E_TILE=max(8, min(128, SCAN_TILE_ELEMS // nc_pad)), num_warps=8)
    _align_scatter_kernel[(n_chunks,)](topk_ids, chunk_row, sorted_ids, block_start, expert_ids, numel, num_experts,
                                       n_blocks, -(-n_blocks // n_chunks), CHUNK=CHUNK, SUB=64,
                                       E_PAD=e_pad, B_TILE=64 if e_pad <= 256 else 32, num_warps=4)
    return sorted_ids, expert_ids, total
