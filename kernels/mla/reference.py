"""Pure-torch twins of the MLA kernels: the spec they are tested against (CPU-runnable, no triton).

Attention is DeepSeek-V3 `inference/model.py`'s "absorb" path over a latent cache: the caller
folds wkv_b's K half into the query (q_nope_absorbed = q_nope @ W_UK, [.., H, 512]) and applies its
V half to the latent output afterwards. Per query row and head:

    scores[t] = (q_nope_absorbed . kv_c[t] + q_pe . k_pe[t]) * softmax_scale     (float32)
    out       = sum_t softmax(scores)[t] * kv_c[t]                               ([512], cast to out_dtype)

with kv_c / k_pe the *dequantized* cache (cache.dequantize_kv_tokens), so the references measure the
kernels' own arithmetic error; the cache's quantization error is the store's business. A row that
sees no token (length 0) outputs zeros.
"""

from __future__ import annotations

import torch
from dsquant.kernels.mla.cache import (
    DS_GROUP,
    DS_ROPE_OFFSET,
    DS_SCALE_OFFSET,
    KV_LORA_RANK,
    ROPE_DIM,
    dequantize_kv_tokens,
    kv_cache_dtype,
)

from dsquant.formats.fp8 import FP8_DTYPE, FP8_E4M3_MAX, quantize_fp8_per_token_group


def cache_store_ref(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
    ue8m0: bool = False,
) -> None:
    """Write T new tokens into the cache in place, quantizing on store.

    Args:
        kv_c: [T, 512] bf16/fp32, the normed latent. k_pe: [T, 64], the roped key part.
        kv_cache: one layer's pool (cache.py layouts). slot_mapping: [T] int, flat slot per token;
            a negative slot skips that token (padding).
        kv_scale: float32 [] per-tensor scale, "fp8" only (q = clamp(x / kv_scale, +-448) to E4M3,
            the dsquant.formats.fp8 cast). ue8m0: "fp8_ds" only, power-of-two group scales.
    """
    kind = kv_cache_dtype(kv_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    x = torch.cat([kv_c[keep].float(), k_pe[keep].float()], dim=-1)  # [N, 576] float32
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    if kind == "bf16":
        flat[slots] = x.to(torch.bfloat16)
    elif kind == "fp8":
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8 cache needs its float32 per-tensor scale")
        flat[slots] = (x / kv_scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    else:
        q, scale = quantize_fp8_per_token_group(x[:, :KV_LORA_RANK], DS_GROUP, ue8m0=ue8m0, name="kv_c")
        row = torch.cat(
            [
                q.view(torch.uint8),  # [N, 512]
                scale.contiguous().view(torch.uint8),  # [N, 16]
                x[:, KV_LORA_RANK:].to(torch.bfloat16).contiguous().view(torch.uint8),  # [N, 128]
            ],
            dim=-1,
        )
        assert row.shape[-1] == kv_cache.shape[-1] and DS_SCALE_OFFSET + 16 == DS_ROPE_OFFSET
        flat[slots] = row


def _sequence_slots(block_table: torch.Tensor, b: int, length: int, page_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=block_table.device)
    return block_table[b, pos // page_size].long() * page_size + pos % page_size  # [length]


def _attend(q_nope, q_pe, kv_c, k_pe, visible, softmax_scale):
    """q [M, H, 512] / [M, H, 64], keys [L, 512] / [L, 64], visible [M] -> float32 [M, H, 512]."""
    scores = torch.einsum("mhc,tc->mht", q_nope.float(), kv_c) + torch.einsum("mhr,tr->mht", q_pe.float(), k_pe)
    scores = scores * softmax_scale
    cols = torch.arange(kv_c.shape[0], device=scores.device)
    scores = scores.masked_fill(cols[None, None, :] >= visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: NaN -> 0
    return torch.einsum("mht,tc->mhc", probs, kv_c)


def _check_q(q_nope: torch.Tensor, q_pe: torch.Tensor) -> None:
    if q_nope.shape[-1] != KV_LORA_RANK or q_pe.shape[-1] != ROPE_DIM or q_nope.shape[:-1] != q_pe.shape[:-1]:
        raise ValueError(
            f"q_nope {tuple(q_nope.shape)} / q_pe {tuple(q_pe.shape)}: expected [.., H, 512] / [.., H, 64]"
        )


def mla_decode_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One new token per sequence attends over its whole cached context (num_splits: kernel schedule only).

    Args: q_nope [B, H, 512], q_pe [B, H, 64]; block_table [B, max_pages] int32; seq_lens [B] int32
    (tokens cached, the new one included). Returns [B, H, 512] in out_dtype (default q_nope.dtype).
    """
    _check_q(q_nope, q_pe)
    page_size = kv_cache.shape[1]
    out = torch.zeros(q_nope.shape, dtype=torch.float32, device=q_nope.device)
    for b, length in enumerate(seq_lens.tolist()):
        kv_c, k_pe = dequantize_kv_tokens(kv_cache, _sequence_slots(block_table, b, length, page_size), kv_scale)
        visible = torch.full((1,), length, device=q_nope.device)
        out[b] = _attend(q_nope[b : b + 1], q_pe[b : b + 1], kv_c, k_pe, visible, softmax_scale)[0]
    return out.to(out_dtype or q_nope.dtype)


def mla_prefill_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    softmax_scale: float,
    kv_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Chunked prefill / extend: the new tokens of each sequence attend causally over its cache.

    Args: q_nope [T, H, 512], q_pe [T, H, 64], the new tokens of all sequences back to back;
    query_start_loc [B + 1] int32 (sequence b's queries are rows [qsl[b], qsl[b+1])); seq_lens [B]
    int32, cached tokens *including* the new ones, which are the last ones. Query i of b sits at
    position seq_lens[b] - q_len[b] + i and sees positions 0..itself. Returns [T, H, 512].
    """
    _check_q(q_nope, q_pe)
    page_size = kv_cache.shape[1]
    out = torch.zeros(q_nope.shape, dtype=torch.float32, device=q_nope.device)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        if q1 - q0 > length:
            raise ValueError(f"sequence {b}: {q1 - q0} new tokens but seq_lens[{b}] = {length}")
        kv_c, k_pe = dequantize_kv_tokens(kv_cache, _sequence_slots(block_table, b, length, page_size), kv_scale)
        visible = torch.arange(length - (q1 - q0) + 1, length + 1, device=q_nope.device)
        out[q0:q1] = _attend(q_nope[q0:q1], q_pe[q0:q1], kv_c, k_pe, visible, softmax_scale)
    return out.to(out_dtype or q_nope.dtype)
