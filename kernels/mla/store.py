"""Triton kernel that writes new tokens into the paged latent cache, quantizing on store.

Layouts in cache.py; the arithmetic is cache_store_ref's (dsquant.formats.fp8): IEEE division
(`div_rn`, not a multiply by the reciprocal, not the approximate `/`) then clamp to +-448 then
round-to-nearest-even E4M3, so codes and scales are bit-identical to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsquant.kernels import format_codes
from dsquant.kernels.mla.cache import DS_GROUP, DS_ROPE_OFFSET, DS_SCALE_OFFSET, KV_LORA_RANK, ROPE_DIM, kv_cache_dtype

from dsquant.formats.fp8 import FP8_AMAX_FLOOR, FP8_E4M3_MAX


@triton.jit
def _cache_store_kernel(
    kvc_ptr, kpe_ptr, slot_ptr,  # [T, 512], [T, 64], [T] int
    val_ptr, sc_ptr, pe_ptr,  # views of the cache: values, fp8_ds scales (float32), rope part
    kv_scale_ptr,  # float32 [] ("fp8")
    stride_kvc, stride_kpe,
    VAL_W: tl.constexpr, SC_W: tl.constexpr, SC_OFF: tl.constexpr, PE_W: tl.constexpr, PE_OFF: tl.constexpr,
    KV_FMT: tl.constexpr, UE8M0: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
    D: tl.constexpr, DR: tl.constexpr, GROUP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing is written (an early exit, not a scalar store mask, which newer
        return  # Triton interpreters reject)
    r = tl.arange(0, DR)
    pe = tl.load(kpe_ptr + t * stride_kpe + r).to(tl.float32)
    if KV_FMT == format_codes.FP8_DS:
        g = tl.arange(0, D // GROUP)
        c = tl.arange(0, GROUP)
        offs = g[:, None] * GROUP + c[None, :]  # [4, 128]
        x = tl.load(kvc_ptr + t * stride_kvc + offs).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))  # [4]
        if UE8M0:  # round up to a power of two by the bits, as formats.fp8.ceil_to_ue8m0
            bits = scale.to(tl.int32, bitcast=True)
            exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
            scale = (exp << 23).to(tl.float32, bitcast=True)
        q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -FP8_MAX, FP8_MAX)
        tl.store(val_ptr + slot * VAL_W + offs, q.to(val_ptr.dtype.element_ty))
        tl.store(sc_ptr + slot * SC_W + SC_OFF + g, scale)
        tl.store(pe_ptr + slot * PE_W + PE_OFF + r, pe.to(tl.bfloat16))
    else:
        d = tl.arange(0, D)
        x = tl.load(kvc_ptr + t * stride_kvc + d).to(tl.float32)
        if KV_FMT == format_codes.FP8_TENSOR:
            s = tl.load(kv_scale_ptr)
            x = tl.clamp(tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * s), -FP8_MAX, FP8_MAX)
            pe = tl.clamp(tl.math.div_rn(pe, tl.full(pe.shape, 1.0, tl.float32) * s), -FP8_MAX, FP8_MAX)
        tl.store(val_ptr + slot * VAL_W + d, x.to(val_ptr.dtype.element_ty))
        tl.store(pe_ptr + slot * PE_W + PE_OFF + r, pe.to(pe_ptr.dtype.element_ty))


def cache_views(kv_cache: torch.Tensor):
    """(values, scales, rope) views of one cache buffer and their per-token widths / offsets in elements.

    Returns (kind, val, val_w, sc, sc_w, sc_off, pe, pe_w, pe_off); for bf16/fp8 the scale view is
    the value view (unused) and the rope part sits at element 512 of the same row.
    """
    kind = kv_cache_dtype(kv_cache)
    if kind != "fp8_ds":
        w = kv_cache.shape[-1]
        return kind, kv_cache, w, kv_cache, w, 0, kv_cache, w, KV_LORA_RANK
    w = kv_cache.shape[-1]  # 656 bytes
    return (
        kind,
        kv_cache.view(torch.float8_e4m3fn), w,
        kv_cache.view(torch.float32), w // 4, DS_SCALE_OFFSET // 4,
        kv_cache.view(torch.bfloat16), w // 2, DS_ROPE_OFFSET // 2,
    )


def cache_store(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
    ue8m0: bool = False,
) -> None:
    """Write T new tokens into the cache in place, quantizing on store (see cache_store_ref).

    Args:
        kv_c: [T, 512] bf16/fp16/fp32 normed latent (last dim contiguous). k_pe: [T, 64] roped key.
        kv_cache: one layer's pool, a contiguous cache.py layout. slot_mapping: [T] int32/int64 flat
            slots (page * page_size + offset); negative slots are skipped.
        kv_scale: float32 [] per-tensor scale ("fp8" only). ue8m0: power-of-two group scales ("fp8_ds").
    """
    kind, val, val_w, sc, sc_w, sc_off, pe, pe_w, pe_off = cache_views(kv_cache)
    t = kv_c.shape[0]
    assert kv_c.dim() == 2 and kv_c.shape[1] == KV_LORA_RANK and kv_c.stride(1) == 1, f"kv_c {tuple(kv_c.shape)}"
    assert k_pe.dim() == 2 and k_pe.shape == (t, ROPE_DIM) and k_pe.stride(1) == 1, f"k_pe {tuple(k_pe.shape)}"
    assert slot_mapping.shape == (t,) and not slot_mapping.is_floating_point(), f"slot_mapping {slot_mapping.shape}"
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert kv_c.device == kv_cache.device == slot_mapping.device, "kv_c, kv_cache and slot_mapping on one device"
    if kind == "fp8":
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8 cache needs its float32 per-tensor scale")
        assert kv_scale.numel() == 1 and kv_scale.dtype == torch.float32, "kv_scale: float32 scalar"
    if t == 0:
        return
    _cache_store_kernel[(t,)](
        kv_c, k_pe, slot_mapping, val, sc, pe, kv_scale if kind == "fp8" else val,
        kv_c.stride(0), k_pe.stride(0),
        VAL_W=val_w, SC_W=sc_w, SC_OFF=sc_off, PE_W=pe_w, PE_OFF=pe_off,
        KV_FMT=format_codes.KV_CACHE_FORMATS[kind], UE8M0=ue8m0, FP8_MAX=FP8_E4M3_MAX,
        AMAX_FLOOR=FP8_AMAX_FLOOR,
        D=KV_LORA_RANK, DR=ROPE_DIM, GROUP=DS_GROUP, num_warps=4,
    )
