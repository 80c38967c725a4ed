"""Triton scaled-mm GEMMs: FP8 block (DeepSeek), INT8 W8A8, and FP4 weights (NVFP4, MXFP4) with bf16 activations.

out[M, N] = x[M, K] @ W[N, K]^T. Two kernels serve every weight format (the W_FMT constexpr):
- `_gemm_persistent_kernel` (M > 64): one CTA per SM walks the output tiles in grouped order; x and W
  tiles come through TMA tensor descriptors (`tl.make_tensor_descriptor`). Tiles are autotuned per
  (N, K, format, M bucket) from configs.py.
- `_gemm_swap_ab_kernel` (M <= 64): a decode GEMM is a weight stream. The weight tile is the MMA's
  M side (128 rows) and the few tokens its N side, so no MMA rows are spent on padding tokens; K is
  split over CTAs to fill the GPU, and `_splitk_reduce_kernel` sums the fp32 partials in a fixed
  order, so results do not depend on timing.
Numerics per format:
- FP8_BLOCK: per 128-K step acc += dot(a, w^T) * a_s[:, None] * w_s[None, :] in fp32 (DeepSeek /
  DeepGEMM promotion: the tensor core never accumulates across scale groups).
- INT8: exact int32 dot over all of K, then out = acc * a_s * w_s (+ bias) in fp32.
- NVFP4 / MXFP4 (W4A16): E2M1 codes decoded in registers and multiplied by their E4M3 / E8M0 block
  scale, which is exact in bf16 (2 significant bits times 4), then a bf16 MMA; the NVFP4 global
  scale multiplies in the epilogue. W4A8 and native FP4 live in triton_fp4.py.
"""

from __future__ import annotations

import functools
import threading

import torch
import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.gemm import configs
from dsquant.kernels.gemm.tiles import (
    dot_scaled_mxfp4,
    epilogue,
    fp8_step_scale,
    load_mxfp4_as_fp8,
    load_weight,
)
from dsquant.kernels.tile_order import grouped_tile

_SCALE_GROUP = {format_codes.FP8_BLOCK: 128, format_codes.INT8: 1, format_codes.NVFP4: 16, format_codes.MXFP4: 32,
                format_codes.MXFP4_W4A8: 32}


# M (and the autotune bucket) vary per call: specializing on M == 1 or M % 16 would only multiply compiles.
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gemm_persistent_kernel(
    a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, global_scale_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_wn, stride_cm, stride_asm, stride_ask, stride_wsn, stride_wsk,
    W_FMT: tl.constexpr, SCALE_GROUP: tl.constexpr, W_PACK: tl.constexpr, HAS_BIAS: tl.constexpr,
    NUM_SMS: tl.constexpr, NATIVE_FP4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K // W_PACK], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K // W_PACK])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=False):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if W_FMT == format_codes.INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])  # [BLOCK_M, BLOCK_K]
            if W_FMT == format_codes.MXFP4_W4A8:
                w, w_s = load_mxfp4_as_fp8(w_desc, w_scale_ptr, stride_wsn, stride_wsk, pid_n * BLOCK_N,
                                           ki * BLOCK_K, N, K, BLOCK_N, BLOCK_K)
            elif not NATIVE_FP4:
                w = load_weight(w_desc, w_scale_ptr, stride_wsn, stride_wsk, pid_n * BLOCK_N, ki * BLOCK_K, N, K,
                                W_FMT, SCALE_GROUP, BLOCK_N, BLOCK_K)
            if W_FMT == format_codes.FP8_BLOCK:  # promote every 128-K step into fp32
                scale = fp8_step_scale(a_scale_ptr, w_scale_ptr, stride_asm, stride_ask, stride_wsn, stride_wsk,
                                       offs_m, offs_n, M, N, ki, SCALE_GROUP)
                acc += tl.dot(a, w.T) * scale
            elif W_FMT == format_codes.MXFP4_W4A8:  # the same promotion; w_s: each row's largest E8M0 scale, the
                # rest of each block's exponent is in the codes
                a_s = tl.load(a_scale_ptr + offs_m * stride_asm + ki * stride_ask, mask=offs_m < M, other=0.0)
                acc += tl.dot(a, w.T) * (a_s[:, None] * w_s[None, :])
            elif NATIVE_FP4:
                acc = dot_scaled_mxfp4(acc, a, w_desc, w_scale_ptr, stride_wsn, stride_wsk, pid_n * BLOCK_N,
                                       ki * BLOCK_K, N, K, BLOCK_N, BLOCK_K)
            else:
                acc = tl.dot(a, w.T, acc, out_dtype=acc.dtype)
        out = epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, stride_asm, stride_wsn,
                       global_scale_ptr, W_FMT)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)


_TUNE = dict(key=["N", "K", "W_FMT", "M_BUCKET"], prune_configs_by={"early_config_prune": configs.early_prune},
             do_bench=configs.tune_bench)
_persistent_8bit = triton.autotune(configs.large_m_configs(format_codes.FP8_BLOCK), **_TUNE)(_gemm_persistent_kernel)
_persistent_fp4 = triton.autotune(configs.large_m_configs(format_codes.NVFP4), **_TUNE)(_gemm_persistent_kernel)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _gemm_swap_ab_kernel(
    a_ptr, w_ptr, c_ptr, part_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, global_scale_ptr,
    M, N, K, SPLIT_K,
    stride_am, stride_wn, stride_cm, stride_asm, stride_ask, stride_wsn, stride_wsk,
    W_FMT: tl.constexpr, SCALE_GROUP: tl.constexpr, W_PACK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K // W_PACK], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K // W_PACK])
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * per_split
    k_hi = tl.minimum(k_lo + per_split, k_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if W_FMT == format_codes.INT8:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for ki in range(k_lo, k_hi):
        a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])  # [BLOCK_M, BLOCK_K]
        w = load_weight(w_desc, w_scale_ptr, stride_wsn, stride_wsk, pid_n * BLOCK_N, ki * BLOCK_K, N, K,
                        W_FMT, SCALE_GROUP, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        if W_FMT == format_codes.FP8_BLOCK:
            a_s = tl.load(a_scale_ptr + offs_m * stride_asm + ki * stride_ask, mask=offs_m < M, other=0.0)
            w_s = tl.load(w_scale_ptr + (offs_n // SCALE_GROUP) * stride_wsn + ki * stride_wsk,
                          mask=offs_n < N, other=0.0)
            acc += tl.dot(w, a.T) * (w_s[:, None] * a_s[None, :])
        else:
            acc = tl.dot(w, a.T, acc, out_dtype=acc.dtype)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if DIRECT_OUT:
        out = epilogue(tl.trans(acc), offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, stride_asm, stride_wsn,
                       global_scale_ptr, W_FMT)  # [BLOCK_M, BLOCK_N] fp32
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        if W_FMT == format_codes.INT8:  # exact int32 partials, scaled once summed (the reference's order)
            part = tl.trans(acc)
        else:
            part = epilogue(tl.trans(acc), offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, stride_asm, stride_wsn,
                            global_scale_ptr, W_FMT)
        tl.store(part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], part, mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, MN, N, SPLIT_K, stride_asm, stride_wsn,
                          INT_PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[MN] = sum over splits of part[SPLIT_K, MN], in split order (int32 parts: times a_s[row] * w_s[col]),
    plus bias[col]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.int32 if INT_PARTS else tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0)
    out = acc.to(tl.float32)
    if INT_PARTS:
        a_s = tl.load(a_scale_ptr + (offs // N) * stride_asm, mask=mask, other=0.0)
        out = out * a_s * tl.load(w_scale_ptr + (offs % N) * stride_wsn, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, out.to(c_ptr.dtype.element_ty), mask=mask)


def reduce_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """out[M, N] = the sum of fp32 split-K partials part[SPLIT_K, M, N], in split order (deterministic)."""
    split, m, n = part.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](part, out, part, part, part, m * n, n, split, 0, 0,
                                                        INT_PARTS=False, HAS_BIAS=False, BLOCK=block)


_TMA_ALLOCATOR_SET = threading.local()
# One launch of an autotuned kernel at a time: threads driving different GPUs (the runner's and the
# converter's multi-GPU workers) otherwise clobber each other's tuning state. A launch is a few
# microseconds; only a first call per (N, K, format, M bucket) holds the lock for its tuning runs.
_AUTOTUNE_LOCK = threading.Lock()


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: the one launching


def _set_tma_allocator() -> None:
    """Device-side tensor descriptors take a small global scratch per launch; Triton asks this allocator for it.

    Triton keeps the allocator in a context variable, so each thread (one per GPU when the runner or the
    converter spreads work over several) must set it for itself."""
    if not getattr(_TMA_ALLOCATOR_SET, "done", False):
        triton.set_allocator(_tma_scratch)
        _TMA_ALLOCATOR_SET.done = True


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few persistent programs still exercise the tile loop
    return torch.cuda.get_device_properties(device).multi_processor_count


def _strides2(t: torch.Tensor | None) -> tuple[int, int]:
    if t is None:
        return 0, 0
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.stride(0), 0)


def launch_gemm(a, w, out_dtype, fmt, *, a_scale=None, w_scale=None, bias=None, global_scale=None, out=None,
                small_m: bool | None = None, small_cfg: dict | None = None, native_fp4: bool | None = None,
                large_cfg: dict | None = None) -> torch.Tensor:
    """Allocate, grid and launch one GEMM; `small_m` / `small_cfg` / `large_cfg` / `native_fp4` force a path or
    tile (tests, benchmarks; large_cfg bypasses the autotuner: BLOCK_*, GROUP_M, num_warps and
    num_stages). MXFP4 at M > 64 uses `tl.dot_scaled` on compute capability >= 10."""
    m, k = a.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    assert out.shape == (m, n) and out.stride(1) == 1 and out.device == a.device, \
        f"out must be [M, N] = {(m, n)} with unit column stride on {a.device}, got {tuple(out.shape)} {out.stride()}"
    ptrs = [t if t is not None else out for t in (a_scale, w_scale, bias, global_scale)]
    strides = (a.stride(0), w.stride(0), out.stride(0), *_strides2(a_scale), *_strides2(w_scale))
    meta = dict(W_FMT=fmt, SCALE_GROUP=_SCALE_GROUP[fmt], W_PACK=2 if fmt in configs.PACKED_FORMATS else 1,
                HAS_BIAS=bias is not None)
    if not configs.interpreting():
        _set_tma_allocator()
    n_sms = num_sms(a.device)
    if small_m if small_m is not None else m <= configs.SMALL_M_MAX:
        assert fmt != format_codes.MXFP4_W4A8, "W4A8 runs only in the persistent kernel"
        cfg = dict(small_cfg or configs.small_m_config(m, n, k, fmt, n_sms))
        split = cfg.pop("SPLIT_K")
        part_dtype = torch.int32 if fmt == format_codes.INT8 else torch.float32
        part = out if split == 1 else torch.empty((split, m, n), dtype=part_dtype, device=a.device)
        assert split == 1 or out.is_contiguous(), "split-K writes a contiguous out"
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
        _gemm_swap_ab_kernel[grid](a, w, out, part, *ptrs, m, n, k, split, *strides,
                                   DIRECT_OUT=split == 1, **meta, **cfg)
        if split > 1:
            block = 1024
            _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
                part, out, ptrs[0], ptrs[1], ptrs[2], m * n, n, split, strides[3], strides[5],
                INT_PARTS=fmt == format_codes.INT8, HAS_BIAS=bias is not None, BLOCK=block)
        return out

    def grid(cfg):
        return (min(n_sms, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])),)

    if native_fp4 is None:
        native_fp4 = fmt == format_codes.MXFP4 and a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 10
    assert not native_fp4 or fmt == format_codes.MXFP4, "tl.dot_scaled serves MXFP4 (E8M0 scales) only"
    meta["NATIVE_FP4"] = native_fp4
    args = (a, w, out, *ptrs, m, n, k, configs.m_bucket(m), *strides)
    if configs.interpreting() or large_cfg is not None:
        cfg = large_cfg if large_cfg is not None else configs.interpreter_config(fmt)
        _gemm_persistent_kernel[grid](*args, NUM_SMS=n_sms, **meta, **cfg)
    else:
        kernel = _persistent_fp4 if fmt in configs.FP4_FORMATS else _persistent_8bit
        with _AUTOTUNE_LOCK:  # Triton's Autotuner keeps the arguments of the call it is tuning on itself
            kernel[grid](*args, NUM_SMS=n_sms, **meta)
    return out


def row_major(t: torch.Tensor) -> torch.Tensor:
    """TMA needs a unit inner stride and 16-byte aligned rows; copy only a tensor that lacks them."""
    aligned = t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    return t if aligned else t.contiguous()


def _check_operands(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[int, int, int]:
    """a [M, K] and b [N, K], both of `dtype` -> (M, N, K)."""
    assert a.dtype == dtype and b.dtype == dtype, f"{dtype} operands expected, got {a.dtype} and {b.dtype}"
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1], f"shapes {tuple(a.shape)} x {tuple(b.shape)}"
    return a.shape[0], b.shape[0], a.shape[1]


def fp8_block_operands(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                       b_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check fp8_block_gemm's operands (shapes, dtypes, K % 128) -> (a, b) with TMA-ready rows."""
    m, n, k = _check_operands(a, b, torch.float8_e4m3fn)
    assert k % 128 == 0, f"K={k} must be a multiple of 128 (the scale group)"
    assert a_scale.dtype == torch.float32 and tuple(a_scale.shape) == (m, k // 128), \
        f"a_scale {a_scale.dtype} {tuple(a_scale.shape)}, expected float32 {(m, k // 128)}"
    assert b_scale.dtype == torch.float32 and tuple(b_scale.shape) == (triton.cdiv(n, 128), k // 128), \
        f"b_scale {b_scale.dtype} {tuple(b_scale.shape)}, expected float32 {(triton.cdiv(n, 128), k // 128)}"
    return row_major(a), row_major(b)


def fp8_block_gemm_triton(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                          out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_block_gemm through the portable Triton kernels at every M (the Gluon kernel's fallback)."""
    a, b = fp8_block_operands(a, a_scale, b, b_scale)
    return launch_gemm(a, b, out_dtype, format_codes.FP8_BLOCK, a_scale=a_scale, w_scale=b_scale, out=out)


def int8_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 INT8 GEMM with a fused epilogue: out = (a @ b^T) * a_scale * b_scale^T + bias.

    Args:
        a: int8 [M, K], K % 16 == 0; a_scale: float32 [M, 1] (per token).
        b: int8 [N, K]; b_scale: float32 [N, 1] (per output channel).
        bias: optional [N] (float32, bfloat16 or float16).
        out: optional preallocated [M, N] output.
    Returns:
        out_dtype [M, N].
    """
    m, n, k = _check_operands(a, b, torch.int8)
    assert k % 16 == 0, f"K={k} must be a multiple of 16 (16-byte TMA rows)"
    assert a_scale.dtype == torch.float32 and a_scale.numel() == m, f"a_scale {a_scale.dtype} {tuple(a_scale.shape)}"
    assert b_scale.dtype == torch.float32 and b_scale.numel() == n, f"b_scale {b_scale.dtype} {tuple(b_scale.shape)}"
    assert bias is None or (bias.numel() == n and bias.is_contiguous()), f"bias {tuple(bias.shape)} for N={n}"
    return launch_gemm(row_major(a), row_major(b), out_dtype, format_codes.INT8,
                       a_scale=a_scale.reshape(m, 1), w_scale=b_scale.reshape(n, 1), bias=bias, out=out)
