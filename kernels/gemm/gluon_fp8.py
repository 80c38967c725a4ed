"""DeepSeek FP8 block GEMM for Hopper in Gluon: warp-specialized, DeepGEMM-style promotion.

`fp8_block_gemm_gluon` computes exactly what triton.fp8_block_gemm computes (same operands, same
per-128-K promotion, reference.fp8_block_gemm_ref), with a hand-scheduled kernel for M > 64:
- one loader warp streams [BLOCK_M, 128] activation and [BLOCK_N, 128] weight tiles through a ring of
  STAGES shared-memory buffers with TMA (an mbarrier per buffer for "ready" and one for "empty");
- two consumer warpgroups each own half of the tile's rows (64 x BLOCK_N). Each issues the wgmma of K
  block k+1 (asynchronously, into a second register accumulator) before it waits for block k and
  promotes it, acc += mma_k * a_s[row] * w_s, so the tensor cores run while the FMAs do; the two
  warpgroups also interleave with each other;
- register budgets per partition (setmaxnreg through gl.warp_specialize): the loader needs few, the
  consumers hold an fp32 accumulator plus two in-flight MMA results;
- a persistent grid walks the output tiles in grouped order; each consumer stores its half-tile
  through shared memory with a TMA store that overlaps the next tile's main loop.
M <= configs.SMALL_M_MAX (a weight stream) and outputs whose rows TMA cannot address go to
triton.fp8_block_gemm_triton unchanged. fp8_block_gemm itself dispatches here on Hopper from
configs.GLUON_MIN_M rows (dispatches_to_gluon).

Gluon is compiled only for the GPU (no interpreter); this module imports anywhere, and the wrapper
says what is missing where the Triton lacks the Gluon Hopper API it is written against (Triton 3.6).
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
from dsquant.kernels.gemm import configs
from dsquant.kernels.gemm.triton import fp8_block_gemm_triton, fp8_block_operands, num_sms
from dsquant.kernels.tile_order import grouped_tile

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # TMA copies: async_copy_* in Triton 3.6, renamed async_load / async_store later (3.9 has only those)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _IMPORT_ERROR = None
except ImportError as e:  # a Triton without Gluon, or with its Hopper names elsewhere
    gluon = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

# The tile: two consumer warpgroups of 64 rows; BLOCK_N = the weight scale block, so one w_s per K step.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
GROUP_M = 8
STAGES = 5  # 32 KB per stage, plus 2 x 64 x 128 output staging: 5 stages fit the 227 KB of shared memory
# Registers per thread: 12 warps (consumer, loader padded to a warpgroup, consumer) share 64K registers.
MAX_REGS, LOADER_REGS, CONSUMER_REGS = 168, 24, 240
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache  # a property of the installed Triton; signature inspection is too slow for every launch
def gluon_missing() -> str | None:
    """Why this Triton cannot build the kernel (one line), or None when it can."""
    if _IMPORT_ERROR is not None:
        return f"triton {triton.__version__} lacks the Gluon Hopper API ({_IMPORT_ERROR})"
    want = {
        "gl.warp_specialize": (gl.warp_specialize, ["functions_and_args", "worker_num_warps", "worker_num_regs"]),
        "warpgroup_mma": (warpgroup_mma, ["a", "b", "acc", "use_acc", "is_async"]),
        "warpgroup_mma_wait": (warpgroup_mma_wait, ["num_outstanding", "deps"]),
        "TMA load": (_tma_load, ["tensor_desc", "coord", "barrier", "result"]),
        "TMA store": (_tma_store, ["tensor_desc", "coord", "src"]),
    }
    for name, (fn, params) in want.items():
        have = list(inspect.signature(fn).parameters)
        if any(p not in have for p in params):
            return (f"triton {triton.__version__}: {name}{tuple(have)} lacks {params} "
                    "(written for the Gluon of Triton 3.6-3.9)")
    return None


def _jit(fn):
    """gluon.jit where Gluon exists; elsewhere the plain function, which fp8_block_gemm_gluon never launches."""
    return gluon.jit(fn) if gluon is not None else fn


@_jit
def _load_partition(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K,
                    NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """One warp: TMA loads of each tile's K blocks into the stage ring, in the consumers' tile order."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    it = 0
    for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        for ki in range(k_tiles):
            s = it % STAGES
            # A fresh mbarrier counts as having completed the phase before 0, so the first lap does not wait.
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(a_desc, [pid_m * BLOCK_M, ki * BLOCK_K], bar, a_bufs.index(s))
            _tma_load(b_desc, [pid_n * BLOCK_N, ki * BLOCK_K], bar, b_bufs.index(s))
            it += 1


@_jit
def _issue(a_bufs, b_bufs, ready, it, s, acc_regs, WG: gl.constexpr, WG_M: gl.constexpr, STAGES: gl.constexpr):
    """Wait for K step `it`'s stage s, then start this warpgroup's MMA on it into acc_regs (overwritten)."""
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(s).slice(WG * WG_M, WG_M), b_bufs.index(s).permute((1, 0)), acc_regs,
                         use_acc=False, is_async=True)


@_jit
def _step_scale(a_s_ptrs, m_ok, w_s_ptr, ki, stride_ask, stride_wsk):
    """K step ki's promotion factor per row: a_s[row, ki] * w_s[tile column, ki]."""
    return gl.load(a_s_ptrs + ki * stride_ask, mask=m_ok, other=0.0) * gl.load(w_s_ptr + ki * stride_wsk)


@_jit
def _after(regs, dep):
    """regs, unchanged, but only once `dep` is computed. The MMA that next overwrites X must not be scheduled
    before the FMAs that read X's previous result: LLVM would then copy X while the MMA writes it."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [regs, dep], dtype=gl.float32, is_pure=True,
                                     pack=1)


@_jit
def _consume_partition(WG: gl.constexpr, a_bufs, b_bufs, ready, empty, c_desc, c_bufs, a_scale_ptr, w_scale_ptr,
                       M, N, K, stride_asm, stride_ask, stride_wsn, stride_wsk,
                       NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup: rows [WG * 64, WG * 64 + 64) of every tile; MMA k + 1 in flight while k is promoted."""
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    WG_M: gl.constexpr = c_desc.block_type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    rows: gl.constexpr = gl.SliceLayout(1, layout)
    c_smem = c_bufs.index(WG)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    # Two register tiles take the MMA results in fixed roles, X for even K steps and Y for odd ones (the loop
    # below is unrolled by two for that): swapping them would copy an in-flight accumulator, which makes
    # ptxas serialize every wgmma.
    x = gl.zeros([WG_M, BLOCK_N], gl.float32, layout)
    y = gl.zeros([WG_M, BLOCK_N], gl.float32, layout)
    it = 0
    for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M + WG * WG_M
        offs_m = off_m + gl.arange(0, WG_M, layout=rows)
        a_s_ptrs = a_scale_ptr + offs_m * stride_asm
        m_ok = offs_m < M
        w_s_ptr = w_scale_ptr + pid_n * stride_wsn  # BLOCK_N == 128: the tile is one weight-scale column
        acc = gl.zeros([WG_M, BLOCK_N], gl.float32, layout)

        s_x = it % STAGES
        tx = _issue(a_bufs, b_bufs, ready, it, s_x, x, WG, WG_M, STAGES)
        scale_x = _step_scale(a_s_ptrs, m_ok, w_s_ptr, 0, stride_ask, stride_wsk)
        for ki in range(1, k_tiles - 1, 2):
            s_y = (it + 1) % STAGES
            scale_y = _step_scale(a_s_ptrs, m_ok, w_s_ptr, ki, stride_ask, stride_wsk)
            ty = _issue(a_bufs, b_bufs, ready, it + 1, s_y, y, WG, WG_M, STAGES)
            x = warpgroup_mma_wait(num_outstanding=1, deps=(tx, ))  # step ki - 1 finished, ki runs
            mbarrier.arrive(empty.index(s_x), count=1)
            acc = acc + x * scale_x[:, None]
            x = _after(x, acc)

            s_x = (it + 2) % STAGES
            scale_x = _step_scale(a_s_ptrs, m_ok, w_s_ptr, ki + 1, stride_ask, stride_wsk)
            tx = _issue(a_bufs, b_bufs, ready, it + 2, s_x, x, WG, WG_M, STAGES)
            y = warpgroup_mma_wait(num_outstanding=1, deps=(ty, ))
            mbarrier.arrive(empty.index(s_y), count=1)
            acc = acc + y * scale_y[:, None]
            it += 2
        if k_tiles % 2 == 0:  # one odd step left: Y
            s_y = (it + 1) % STAGES
            scale_y = _step_scale(a_s_ptrs, m_ok, w_s_ptr, k_tiles - 1, stride_ask, stride_wsk)
            ty = _issue(a_bufs, b_bufs, ready, it + 1, s_y, y, WG, WG_M, STAGES)
            x = warpgroup_mma_wait(num_outstanding=1, deps=(tx, ))
            mbarrier.arrive(empty.index(s_x), count=1)
            acc = acc + x * scale_x[:, None]
            y = warpgroup_mma_wait(num_outstanding=0, deps=(ty, ))
            mbarrier.arrive(empty.index(s_y), count=1)
            acc = acc + y * scale_y[:, None]
            it += 2
        else:
            x = warpgroup_mma_wait(num_outstanding=0, deps=(tx, ))
            mbarrier.arrive(empty.index(s_x), count=1)
            acc = acc + x * scale_x[:, None]
            it += 1

        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, pid_n * BLOCK_N], c_smem)
    tma.store_wait(pendings=0)


@_jit
def _fp8_block_gemm_ws_kernel(a_desc, b_desc, c_desc, a_scale_ptr, w_scale_ptr, M, N, K,
                              stride_asm, stride_ask, stride_wsn, stride_wsk,
                              NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                              LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)  # the loader's expect; TMA bytes complete it
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    shared = (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, a_scale_ptr, w_scale_ptr, M, N, K,
              stride_asm, stride_ask, stride_wsn, stride_wsk, NUM_SMS, GROUP_M, STAGES)
    gl.warp_specialize([
        (_consume_partition, (0, ) + shared),
        (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_SMS, GROUP_M, STAGES)),
        (_consume_partition, (1, ) + shared),
    ], [1, 4], [LOADER_REGS, CONSUMER_REGS])


def dispatches_to_gluon(m: int, device: torch.device) -> bool:
    """Whether fp8_block_gemm runs this kernel: M >= configs.GLUON_MIN_M on a compute capability 9.x GPU, with a
    Triton that has the Gluon API used here."""
    return (m >= configs.GLUON_MIN_M and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and gluon_missing() is None)


def _tma_rows_ok(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


@functools.cache  # layouts depend on the tile and dtype alone; building one per launch costs host time
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype):
    gl_dtype = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
                torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def _descriptor(t: torch.Tensor, block: list[int]):
    return TensorDescriptor.from_tensor(t, block, _shared_layout(tuple(block), t.dtype))


def _launch_constants() -> dict:
    return dict(NUM_SMS=None, GROUP_M=GROUP_M, STAGES=STAGES, LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS)


def compile_sm90(out_dtype: torch.dtype = torch.bfloat16, num_sms: int = 132):
    """The kernel as a launch builds it, compiled for sm_90a on any machine (no GPU needed): Triton's
    CompiledKernel, whose asm["ptx"] shows what ptxas makes of the schedule."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    ops = torch.empty(BLOCK_M, BLOCK_K, dtype=torch.float8_e4m3fn)
    descs = dict(a_desc=_descriptor(ops, [BLOCK_M, BLOCK_K]), b_desc=_descriptor(ops, [BLOCK_N, BLOCK_K]),
                 c_desc=_descriptor(torch.empty(BLOCK_M, BLOCK_N, dtype=out_dtype), [BLOCK_M // 2, BLOCK_N]))
    params = list(inspect.signature(_fp8_block_gemm_ws_kernel.fn).parameters)
    constants = dict(_launch_constants(), NUM_SMS=num_sms)
    signature = {p: "constexpr" if p in constants else mangle_type(descs[p]) if p in descs
                 else "*fp32" if p.endswith("_ptr") else "i32" for p in params}
    src = GluonASTSource(_fp8_block_gemm_ws_kernel, signature, {(params.index(p),): v for p, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=MAX_REGS))


def fp8_block_gemm_gluon(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                         out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_block_gemm (same arguments, same result) through the warp-specialized Gluon kernel on Hopper.

    Args:
        a: float8_e4m3fn [M, K], K % 128 == 0; a_scale: float32 [M, K // 128] (any strides).
        b: float8_e4m3fn [N, K]; b_scale: float32 [ceil(N / 128), K // 128] (DeepSeek `weight_scale_inv`).
        out_dtype: bfloat16 (default), float16 or float32; out: optional preallocated [M, N] output.
    Returns:
        out_dtype [M, N]. M <= configs.SMALL_M_MAX, or an output whose rows are not 16-byte aligned,
        runs triton.fp8_block_gemm_triton.
    Raises:
        RuntimeError: a Triton without the Gluon API used here, or not a CUDA device of compute capability 9.x.
    """
    a, b = fp8_block_operands(a, a_scale, b, b_scale)
    m, k = a.shape
    n = b.shape[0]
    out_dtype = out.dtype if out is not None else out_dtype
    assert out_dtype in _OUT_DTYPES, f"out_dtype {out_dtype}: expected one of {_OUT_DTYPES}"
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    assert tuple(out.shape) == (m, n) and out.device == a.device, \
        f"out must be [M, N] = {(m, n)} on {a.device}, got {tuple(out.shape)} on {out.device}"
    if m <= configs.SMALL_M_MAX or not _tma_rows_ok(out):
        return fp8_block_gemm_triton(a, a_scale, b, b_scale, out=out)
    missing = gluon_missing()
    if missing is not None:
        raise RuntimeError(f"fp8_block_gemm_gluon: {missing}; use fp8_block_gemm")
    if not a.is_cuda or torch.cuda.get_device_capability(a.device)[0] != 9:
        where = a.device if not a.is_cuda else f"compute capability {torch.cuda.get_device_capability(a.device)}"
        raise RuntimeError(f"fp8_block_gemm_gluon runs on Hopper (sm_90) only, got {where}: use fp8_block_gemm")
    a_desc = _descriptor(a, [BLOCK_M, BLOCK_K])
    b_desc = _descriptor(b, [BLOCK_N, BLOCK_K])
    c_desc = _descriptor(out, [BLOCK_M // 2, BLOCK_N])
    sms = num_sms(a.device)
    grid = (min(sms, triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)),)
    _fp8_block_gemm_ws_kernel[grid](
        a_desc, b_desc, c_desc, a_scale, b_scale, m, n, k,
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        **dict(_launch_constants(), NUM_SMS=sms), num_warps=4, maxnreg=MAX_REGS)
    return out


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek FP8 block GEMM: out = (a * a_scale) @ (b * b_scale)^T, scaled per 128-K step in fp32.

    Args:
        a: float8_e4m3fn [M, K], K % 128 == 0 (activations quantized per 1x128 group).
        a_scale: float32 [M, K // 128], row-major or the column-major (transposed-contiguous) view.
        b: float8_e4m3fn [N, K] (weight; N need not be a multiple of 128, e.g. 2112 or 576).
        b_scale: float32 [ceil(N / 128), K // 128] (DeepSeek `weight_scale_inv`).
        out_dtype: bfloat16 (default), float16 or float32.
        out: optional preallocated [M, N] output (its dtype wins over out_dtype).
    Returns:
        out_dtype [M, N]. On Hopper, M >= configs.GLUON_MIN_M runs the Gluon kernel below where this
        Triton has its API; anything else runs the Triton kernels (fp8_block_gemm_triton).
    """
    if dispatches_to_gluon(a.shape[0], a.device):
        return fp8_block_gemm_gluon(a, a_scale, b, b_scale, out_dtype, out)
    return fp8_block_gemm_triton(a, a_scale, b, b_scale, out_dtype, out)
