"""Grouped expert GEMMs: gate_up with a SiLU*mul (+ FP8 1x128 quant) epilogue, then down with the routing weight.

Rows are the routed slots in moe_align order; every BLOCK_M rows belong to one expert. Per format, the tensor cores
see (spec: reference.expert_mlp_ref):
    bf16   bf16 x bf16
    fp8    x quantized 1x128 inside the gate_up kernel (decode tiles) or once up front (prefill tiles), the
           activation by the gate_up epilogue (BLOCK_N = 128 is one group); fp8 x fp8 per 128-deep K step, scaled by
           a_scale x w_scale of the 128x128 block
    int8   rows pre-quantized per token (x and the activation, by kernels.quant); int32 accumulation, scaled at
           the end
    nvfp4  W4A16: E2M1 x block scale decoded to bf16 in registers (kernels/fp4_decode.py; exact: at most 6
    mxfp4  significant bits), global scale on the accumulator; MXFP4 the same with power-of-two scales and no global
           scale. Decode tiles make two dots, the even and odd K elements (low and high nibbles), so the packed bytes
           are never interleaved
    nvfp4 with input scales (W4A4 numerics, DeepSeek-V4's NVFP4 experts): each slot's activation rows are NVFP4
           quantize-dequantized with its expert's scale in torch before each GEMM (x per slot, the SwiGLU output
           between the kernels) and the bf16 result is the A operand, as dsquant.runner.linear's NVFP4 path
SwiGLU clamp (swiglu_limit L > 0, DeepSeek-V4): the gate_up epilogue takes min(gate, L) and clamp(up, -L, L).
Padding rows (slot == T*k) load zeros and are never stored, so a NaN anywhere outside the real rows cannot leak.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.fp4_decode import e2m1_groups_bf16, e8m0_to_bf16
from dsquant.kernels.fp8_cast import cast_fp8, fp8_scale
from dsquant.kernels.moe.align import moe_align
from dsquant.kernels.moe.reference import (
    ExpertWeights,
    as_stack,
    check_expert_weights,
    check_input_scales,
    expert_format,
    quantize_dequantize_activation,
)
from dsquant.kernels.quant.triton import quantize_fp8_per_token_group, quantize_int8_per_token
from dsquant.kernels.tile_order import grouped_tile


@triton.jit
def _fp8_group_rows(x):
    """float32 [R, 128], one 1x128 group per row -> (e4m3 codes [R, 128], float32 scales [R]): the quant kernels'
    scale rule and correctly rounded division (dsquant.formats.fp8's numbers, bit for bit)."""
    scale = fp8_scale(tl.max(tl.abs(x), 1), False)
    return cast_fp8(x, scale[:, None], tl.div_rn(1.0, scale)[:, None], True), scale


@triton.jit
def fp4_tiles(w_ptr, s_ptr, rows_w, rows_s, k0, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed E2M1 rows (pointer offsets rows_w / rows_s [BLOCK_N]) at K offset k0 -> two bf16 [BLOCK_N, BLOCK_K / 2]
    tiles, E2M1 x block scale (exact): the even K elements (low nibbles) and the odd ones (high nibbles)."""
    SB: tl.constexpr = 16 if FMT == format_codes.NVFP4 else 32
    HALF: tl.constexpr = BLOCK_K // 2
    p = tl.load(w_ptr + rows_w[:, None] + (k0 // 2 + tl.arange(0, HALF))[None, :])  # [BN, BK/2] uint8
    s = tl.load(s_ptr + rows_s[:, None] + (k0 // SB + tl.arange(0, BLOCK_K // SB))[None, :])  # [BN, BK/SB]
    return e2m1_groups_bf16(p, s.to(tl.bfloat16) if FMT == format_codes.NVFP4 else e8m0_to_bf16(s), SB)


@triton.jit
def _mainloop(a_ptr, a_scale_ptr, rows_a, rows_as, row_ok, w_ptr, s_ptr, rows_w, rows_s, K,
              FMT: tl.constexpr, QUANT_A: tl.constexpr, FP4_PARITY_DOTS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] = A rows x W rows over K (fp32, int32 for int8), per-block scales applied for fp8.

    FP4 weights: FP4_PARITY_DOTS makes two dots, the even K elements (low nibbles) and the odd ones, so the
    decoded halves are never interleaved (decode tiles, where the decode's instructions are the cost); otherwise
    the halves are interleaved into one tile and one dot takes contiguous A rows (prefill tiles, where the
    stride-2 A loads of the parity dots would cost several times the interleaving)."""
    if FMT == format_codes.INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    offs_even = 2 * tl.arange(0, BLOCK_K // 2)
    for k0 in range(0, K, BLOCK_K):
        if FMT == format_codes.NVFP4 or FMT == format_codes.MXFP4:
            w_even, w_odd = fp4_tiles(w_ptr, s_ptr, rows_w, rows_s, k0, FMT, BLOCK_N, BLOCK_K)
            a_rows = a_ptr + rows_a[:, None] + k0
            if FP4_PARITY_DOTS:  # K split into even and odd elements, as the nibbles of the packed weight
                a_even = tl.load(a_rows + offs_even[None, :], mask=row_ok[:, None], other=0.0)
                acc = tl.dot(a_even, tl.trans(w_even), acc)
                a_odd = tl.load(a_rows + 1 + offs_even[None, :], mask=row_ok[:, None], other=0.0)
                acc = tl.dot(a_odd, tl.trans(w_odd), acc)
            else:  # element 2i is the low nibble of byte i: join and flatten puts it back in place
                w = tl.reshape(tl.join(w_even, w_odd), [BLOCK_N, BLOCK_K])
                a = tl.load(a_rows + offs_k[None, :], mask=row_ok[:, None], other=0.0)
                acc = tl.dot(a, tl.trans(w), acc)
        else:
            a = tl.load(a_ptr + rows_a[:, None] + (k0 + offs_k)[None, :], mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptr + rows_w[None, :] + (k0 + offs_k)[:, None])  # [BK, BN]
            if FMT == format_codes.FP8_BLOCK:
                if QUANT_A:  # dynamic 1x128 group quant of the bf16 rows (dsquant.formats.fp8, same order)
                    a, a_s = _fp8_group_rows(a.to(tl.float32))
                else:
                    a_s = tl.load(a_scale_ptr + rows_as + k0 // BLOCK_K, mask=row_ok, other=1.0)
                w_s = tl.load(s_ptr + rows_s + (k0 // BLOCK_K))  # [BN]: 128x128 block of each column
                acc += tl.dot(a, b) * (a_s[:, None] * w_s[None, :])
            elif FMT == format_codes.INT8:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _moe_gate_up_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, gs_ptr, out_ptr, out_scale_ptr, sorted_ptr, expert_ids_ptr, total_ptr,
    numel, n_m_blocks, K, INTER, TOPK, limit,
    stride_am, stride_asm, stride_we, stride_wn, stride_se, stride_sn, stride_om, stride_osm,
    FMT: tl.constexpr, QUANT_A: tl.constexpr, QUANT_OUT: tl.constexpr, FP4_PARITY_DOTS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    n_n_tiles = tl.num_programs(0) // n_m_blocks
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_m_blocks, n_n_tiles, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):  # past the padded total: read nothing
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = slot < numel
    tok = tl.where(row_ok, slot // TOPK, 0)
    # one B tile of 2 * BLOCK_N rows: BLOCK_N gate rows, then their BLOCK_N up partners (INTER further)
    j = tl.arange(0, 2 * BLOCK_N)
    rows_n = pid_n * BLOCK_N + (j % BLOCK_N) + (j // BLOCK_N) * INTER
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_as = tok * stride_asm
    expert_s = expert * stride_se
    if FMT == format_codes.FP8_BLOCK:  # one scale per 128x128 block
        rows_s = expert_s + (rows_n // 128) * stride_sn
    else:
        rows_s = expert_s + rows_n * stride_sn
    acc = _mainloop(a_ptr, a_scale_ptr, tok * stride_am, rows_as, row_ok, w_ptr, s_ptr,
                    expert * stride_we + rows_n * stride_wn, rows_s, K, FMT, QUANT_A, FP4_PARITY_DOTS,
                    BLOCK_M, 2 * BLOCK_N, BLOCK_K)
    if FMT == format_codes.INT8:
        acc = acc.to(tl.float32) * tl.load(a_scale_ptr + rows_as, mask=row_ok, other=0.0)[:, None]
        acc = acc * tl.load(s_ptr + rows_s)[None, :]
    elif FMT == format_codes.NVFP4:
        acc = acc * tl.load(gs_ptr + expert)
    g, u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    g = g.to(tl.bfloat16).to(tl.float32)
    u = u.to(tl.bfloat16).to(tl.float32)
    if HAS_LIMIT:  # DeepSeek-V4's clamped SwiGLU
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    act = (g * (1.0 / (1.0 + tl.exp(-g))) * u).to(tl.bfloat16)  # [BM, BN]
    out_rows = slot * stride_om
    if QUANT_OUT:  # BLOCK_N == 128: this tile is one 1x128 group of every row
        q, a_s = _fp8_group_rows(act.to(tl.float32))
        tl.store(out_ptr + out_rows[:, None] + offs_n[None, :], q, mask=row_ok[:, None])
        tl.store(out_scale_ptr + slot * stride_osm + pid_n, a_s, mask=row_ok)
    else:
        tl.store(out_ptr + out_rows[:, None] + offs_n[None, :], act, mask=row_ok[:, None])


@triton.jit
def _moe_down_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, gs_ptr, topw_ptr, out_ptr, sorted_ptr, expert_ids_ptr, total_ptr,
    numel, n_m_blocks, K,
    stride_am, stride_asm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    FMT: tl.constexpr, HAS_WEIGHT: tl.constexpr, FP4_PARITY_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    n_n_tiles = tl.num_programs(0) // n_m_blocks
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_m_blocks, n_n_tiles, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):  # past the padded total: read nothing
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = slot < numel
    slot_a = tl.where(row_ok, slot, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_base = expert * stride_se
    if FMT == format_codes.FP8_BLOCK:
        rows_s = s_base + (offs_n // 128) * stride_sn
    else:
        rows_s = s_base + offs_n * stride_sn
    acc = _mainloop(a_ptr, a_scale_ptr, slot_a * stride_am, slot_a * stride_asm, row_ok, w_ptr, s_ptr,
                    expert * stride_we + offs_n * stride_wn, rows_s, K, FMT, False, FP4_PARITY_DOTS,
                    BLOCK_M, BLOCK_N, BLOCK_K)
    if FMT == format_codes.INT8:
        y = acc.to(tl.float32) * tl.load(a_scale_ptr + slot_a * stride_asm, mask=row_ok, other=0.0)[:, None]
        y = y * tl.load(s_ptr + rows_s)[None, :]
    elif FMT == format_codes.NVFP4:
        y = acc * tl.load(gs_ptr + expert)
    else:
        y = acc
    if HAS_WEIGHT:
        y = y * tl.load(topw_ptr + slot_a, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + (slot * stride_om)[:, None] + offs_n[None, :], y.to(tl.bfloat16), mask=row_ok[:, None])


def default_tiles(numel: int, num_experts: int, fmt: str) -> dict:
    """Tile sizes and pipeline depth from the expected rows per expert (performance hyper-parameters).

    Few rows per expert (decode) is weight-streaming: BLOCK_M = 16 (the smallest MMA) and deep pipelining. Many
    rows (prefill) is compute-bound: 64-row tiles reuse each weight tile from shared memory four times as often.
    fp8 and bf16 prefill tiles use 8 warps: on 4 warps the gate_up kernel spills (fp8's per-K-step block scaling
    keeps the dot result beside the 64 x 256 fp32 accumulator; bf16 sits at 255 registers), on 8 neither does
    (benchmarks/results/moe_sm90_ptxas.csv, `bench_moe.py --ptxas`). FP4 decode tiles read 64 bytes per weight row
    per step (BLOCK_K 128) on 4 warps, the fastest of the tiles swept (benchmarks/results/moe_h100.csv).
    """
    rows_per_expert = numel / max(min(num_experts, numel), 1)
    block_m = 16 if rows_per_expert <= 24 else (32 if rows_per_expert <= 64 else 64)
    f = expert_format(fmt)
    if f.packed and block_m == 16:  # decode: 64-byte reads per weight row (32 bytes are slower)
        block_n, block_k, w_bytes, warps = 64, 128, 0.5, 4
    elif f.packed:  # decoded tiles live in registers: keep them at 2 x 64 x 64 per K step
        block_n, block_k, w_bytes, warps = 64, 64, 0.5, 8
    else:  # BLOCK_N = BLOCK_K = 128: one FP8 scale block per tile, one 1x128 activation group per row
        block_n, block_k, w_bytes = 128, 128, 1 if f.quantized else 2
        warps = 8 if f.kernel_code in (format_codes.FP8_BLOCK, format_codes.BF16) and block_m >= 64 else 4
    stage_bytes = block_m * block_k * 2 + 2 * block_n * block_k * w_bytes  # A (bf16 at worst) + gate and up B
    # fp8 x is quantized once up front when each row block meets many N tiles (prefill), in-kernel otherwise.
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps,
                num_stages=max(2, min(4, int(200_000 // stage_bytes))), prequant=rows_per_expert > 64)


def _run_stack(x, ew: ExpertWeights, inter: int, flat_weights, k, sorted_ids, expert_ids, total, tiles,
               limit: float = 0.0, act_scale_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Both grouped GEMMs for aligned rows -> bf16 [T*k, H], each slot's expert output times its weight.
    act_scale_rows: float32 [T*k, 1], the NVFP4 activation scale of each slot's down projection."""
    t, h = x.shape
    numel = t * k
    fmt = format_codes.MOE_FORMATS[ew.fmt]
    dev = x.device
    a, a_scale = x, x  # a_scale unused for bf16 / FP4 and for fp8 quantized in the kernel
    if fmt == format_codes.INT8:
        a, a_scale = quantize_int8_per_token(x)
    quant_a = fmt == format_codes.FP8_BLOCK and not tiles["prequant"]
    if fmt == format_codes.FP8_BLOCK and tiles["prequant"]:
        a, a_scale = quantize_fp8_per_token_group(x)
    n_m = expert_ids.numel()
    bn = tiles["BLOCK_N"]
    launch = {key: tiles[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}
    launch["FP4_PARITY_DOTS"] = not tiles["prequant"]  # decode tiles; prefill tiles interleave (see _mainloop)
    quant_out = fmt == format_codes.FP8_BLOCK
    act = torch.empty((numel, inter), dtype=torch.float8_e4m3fn if quant_out else torch.bfloat16, device=dev)
    act_scale = torch.empty((numel, inter // 128 if quant_out else 1), dtype=torch.float32, device=dev)
    s13 = ew.w13_scale if ew.w13_scale is not None else ew.w13
    gs13 = ew.w13_global_scale.float().reshape(-1) if ew.w13_global_scale is not None else s13
    _moe_gate_up_kernel[(n_m * (inter // bn),)](
        a, a_scale, ew.w13, s13, gs13, act, act_scale, sorted_ids, expert_ids, total,
        numel, n_m, h, inter, k, float(limit),
        a.stride(0), a_scale.stride(0), ew.w13.stride(0), ew.w13.stride(1), s13.stride(0), s13.stride(1),
        act.stride(0), act_scale.stride(0), FMT=fmt, QUANT_A=quant_a, QUANT_OUT=quant_out, HAS_LIMIT=limit > 0,
        **launch)
    if fmt == format_codes.INT8:
        act, act_scale = quantize_int8_per_token(act)
    if act_scale_rows is not None:
        act = quantize_dequantize_activation(ew.fmt, act, act_scale_rows).to(torch.bfloat16)
    out = torch.empty((numel, h), dtype=torch.bfloat16, device=dev)
    s2 = ew.w2_scale if ew.w2_scale is not None else ew.w2
    gs2 = ew.w2_global_scale.float().reshape(-1) if ew.w2_global_scale is not None else s2
    has_w = flat_weights is not None
    _moe_down_kernel[(n_m * (h // bn),)](
        act, act_scale, ew.w2, s2, gs2, flat_weights if has_w else act_scale, out, sorted_ids, expert_ids, total,
        numel, n_m, inter,
        act.stride(0), act_scale.stride(0), ew.w2.stride(0), ew.w2.stride(1), s2.stride(0), s2.stride(1),
        out.stride(0), FMT=fmt, HAS_WEIGHT=has_w, **launch)
    return out


def _check_inputs(x, topk_weights, topk_ids):
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"hidden states: expected bf16 [T, H], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] % 128:
        raise ValueError(f"hidden states: H={x.shape[1]} must be a multiple of 128")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)}: "
                         f"expected [T={x.shape[0]}, k] both")


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    fmt: str = "bf16",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_global_scale: torch.Tensor | None = None,
    w2_global_scale: torch.Tensor | None = None,
    shared: ExpertWeights | None = None,
    swiglu_limit: float = 0.0,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    tiles: dict | None = None,
) -> torch.Tensor:
    """Routed experts plus the optional shared expert, on CUDA (spec and layouts: reference.fused_moe_ref).

    Args:
        x: bf16 [T, H], H % 128 == 0. w13: [E, 2I, H] (gate rows, then up rows; packed [E, 2I, H/2] for FP4).
        w2: [E, H, I] (FP4 [E, H, I/2]); I % 128 == 0.
        topk_weights: float32 [T, k]; topk_ids: int32 [T, k] in [0, E) (deepseek_route's output).
        fmt: "bf16" | "fp8" | "int8" | "nvfp4" | "mxfp4"; the scales as in reference.py.
        shared: the shared expert (weight 1 per token), ExpertWeights in any format.
        swiglu_limit: L > 0 clamps gate and up before the SiLU product (routed and shared experts).
        a13_scale, a2_scale: float32 [E] NVFP4 activation global scales of the routed experts (nvfp4 only;
            module docstring). They cost a host sync (the quantizer's finiteness check) and a [T*k, H] copy of x.
        tiles: overrides of the routed experts' tile choice (keys of default_tiles; benchmarks sweep them).
    Returns:
        [T, H] bf16. No host sync: CUDA-graph capturable for a fixed T.
    """
    _check_inputs(x, topk_weights, topk_ids)
    routed = ExpertWeights(w13, w2, fmt, w13_scale, w2_scale, w13_global_scale, w2_global_scale)
    num_experts, inter = check_expert_weights(routed, x.shape[1], "experts")
    if inter % 128:
        raise ValueError(f"experts: intermediate size I={inter} must be a multiple of 128")
    check_input_scales(fmt, num_experts, a13_scale, a2_scale)
    t, h = x.shape
    k = topk_ids.shape[1]
    if t == 0:  # no launch with an empty grid
        return torch.empty((0, h), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    tiles = default_tiles(t * k, num_experts, fmt) | (tiles or {})
    sorted_ids, expert_ids, total = moe_align(topk_ids.to(torch.int32).contiguous(), num_experts, tiles["BLOCK_M"])
    flat_w = topk_weights.float().contiguous().view(-1)
    if a13_scale is None:
        y = _run_stack(x, routed, inter, flat_w, k, sorted_ids, expert_ids, total, tiles, swiglu_limit)
    else:  # one activation row per slot, quantized with its expert's scale; the kernels then see k = 1
        slot_expert = topk_ids.reshape(-1).long()
        xs = quantize_dequantize_activation(fmt, x.repeat_interleave(k, dim=0),
                                            a13_scale.float().reshape(-1)[slot_expert, None]).to(torch.bfloat16)
        y = _run_stack(xs, routed, inter, flat_w, 1, sorted_ids, expert_ids, total, tiles, swiglu_limit,
                       a2_scale.float().reshape(-1)[slot_expert, None])
    out = y.view(t, k, h).sum(dim=1, dtype=torch.float32)  # [T, H] fp32, the weighted combine
    if shared is not None:
        sh = as_stack(shared)
        _, sh_inter = check_expert_weights(sh, h, "shared expert")
        if sh_inter % 128:
            raise ValueError(f"shared expert: intermediate size I={sh_inter} must be a multiple of 128")
        sh_tiles = default_tiles(t, 1, sh.fmt)
        n_blocks = -(-t // sh_tiles["BLOCK_M"])
        ids = torch.arange(n_blocks * sh_tiles["BLOCK_M"], dtype=torch.int32, device=x.device)  # >= T: padding
        zeros = torch.zeros(n_blocks, dtype=torch.int32, device=x.device)
        total_sh = torch.full((1,), ids.numel(), dtype=torch.int32, device=x.device)
        out += _run_stack(x, sh, sh_inter, None, 1, ids, zeros, total_sh, sh_tiles, swiglu_limit).float()
    return out.to(x.dtype)
