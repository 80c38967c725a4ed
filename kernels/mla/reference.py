"""Pure-torch twins of the MLA kernels: the spec they are tested against (CPU-runnable, no triton).

Attention is DeepSeek-V3 `inference/model.py`'s "absorb" path over a latent cache: the caller
folds wkv_b's K half into the query (q_nope_absorbed = q_nope @ W_UK, [.., H, C]) and applies its
V half to the latent output afterwards. Per query row and head (mla_attention_ref):

    scores[t] = (q_nope_absorbed . kv_c[t] + q_pe . k_pe[t]) * softmax_scale     (float32)
    out       = sum_t softmax(scores)[t] * kv_c[t]                               ([C], cast to out_dtype)

over the keys the row sees: causally, those at its own position or before, narrowed by an optional
mask. A row that sees no token (length 0) outputs zeros. The widths come from the tensors: C =
kv_lora_rank (DeepSeek-V3: 512), R = the rope dims (64); the Triton kernels serve 512 + 64 only.
The cache references read kv_c / k_pe as the *dequantized* cache (cache.dequantize_kv_tokens), so
they measure the kernels' own arithmetic error; the cache's quantization error is the store's business.
"""

from __future__ import annotations

import torch
from dsquant.kernels.mla.cache import DS_GROUP, dequantize_kv_tokens, kv_cache_dtype

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
        kv_c: [T, C] bf16/fp32, the normed latent. k_pe: [T, R], the roped key part.
        kv_cache: one layer's pool (cache.py layouts, for this C + R). slot_mapping: [T] int, flat slot per
            token; a negative slot skips that token (padding).
        kv_scale: float32 [] per-tensor scale, "fp8" only (q = clamp(x / kv_scale, +-448) to E4M3,
            the dsquant.formats.fp8 cast). ue8m0: "fp8_ds" only, power-of-two group scales.
    """
    c, r = kv_c.shape[-1], k_pe.shape[-1]
    kind = kv_cache_dtype(kv_cache, c, r)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    x = torch.cat([kv_c[keep].float(), k_pe[keep].float()], dim=-1)  # [N, C + R] float32
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    if kind == "bf16":
        flat[slots] = x.to(torch.bfloat16)
    elif kind == "fp8":
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8 cache needs its float32 per-tensor scale")
        flat[slots] = (x / kv_scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    else:
        q, scale = quantize_fp8_per_token_group(x[:, :c], DS_GROUP, ue8m0=ue8m0, name="kv_c")
        flat[slots] = torch.cat(
            [
                q.view(torch.uint8),  # [N, C]
                scale.contiguous().view(torch.uint8),  # [N, 4 * C / 128]
                x[:, c:].to(torch.bfloat16).contiguous().view(torch.uint8),  # [N, 2 * R]
            ],
            dim=-1,
        )  # fp8_ds_offsets(c, r) order, checked by kv_cache_dtype's width


def mla_attention_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    softmax_scale: float,
    start_pos: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal absorbed attention of S query rows over T dense latent rows (the spec of both kernels).

    Args:
        q_nope: [B, S, H, C] queries already multiplied by wkv_b's K half. q_pe: [B, S, H, R], roped.
        kv_c: [B, T, C] latent rows of positions 0..T-1 (any float dtype). k_pe: [B, T, R] roped keys.
        start_pos: position of query row 0; row s sits at start_pos + s and sees keys 0..start_pos + s.
        keep: optional bool [B, S, T], the keys each row may read besides causality (V3.2's indexer).
    Returns:
        [B, S, H, C] float32; rows that see no key are zeros.
    """
    s, t = q_nope.shape[1], kv_c.shape[1]
    scores = torch.einsum("bshc,btc->bsht", q_nope.float(), kv_c.float())
    scores = scores + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float())
    scores = scores * softmax_scale
    qpos = torch.arange(start_pos, start_pos + s, device=kv_c.device)
    mask = (torch.arange(t, device=kv_c.device)[None, :] > qpos[:, None])[None]  # [1, S, T] future keys
    if keep is not None:
        mask = mask | ~keep
    probs = scores.masked_fill(mask[:, :, None, :], float("-inf")).softmax(dim=-1)
    dead = mask.all(dim=-1)  # [B or 1, S]: rows that see no key, whose softmax is NaN
    if dead.any():
        probs = probs.masked_fill(dead[:, :, None, None], 0.0)
    return torch.einsum("bsht,btc->bshc", probs, kv_c.float())


def _sequence_latents(kv_cache, block_table, b: int, length: int, kv_scale, c: int, r: int):
    """Dequantized (kv_c [1, length, C], k_pe [1, length, R]) of sequence b's first `length` tokens."""
    page_size = kv_cache.shape[1]
    pos = torch.arange(length, device=block_table.device)
    slots = block_table[b, pos // page_size].long() * page_size + pos % page_size  # [length]
    kv_c, k_pe = dequantize_kv_tokens(kv_cache, slots, kv_scale, kv_lora_rank=c, rope_dim=r)
    return kv_c[None], k_pe[None]


def _latent_widths(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int]:
    """(C, R) from the queries, checked against each other and against the cache's row width."""
    c, r = q_nope.shape[-1], q_pe.shape[-1]
    if q_nope.shape[:-1] != q_pe.shape[:-1]:
        raise ValueError(f"q_nope {tuple(q_nope.shape)} / q_pe {tuple(q_pe.shape)}: expected [.., H, C] / [.., H, R]")
    try:
        kv_cache_dtype(kv_cache, c, r)
    except ValueError as exc:
        raise ValueError(f"q_nope {tuple(q_nope.shape)} / q_pe {tuple(q_pe.shape)}: {exc}") from None
    return c, r


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

    Args: q_nope [B, H, C], q_pe [B, H, R]; block_table [B, max_pages] int32; seq_lens [B] int32
    (tokens cached, the new one included). Returns [B, H, C] in out_dtype (default q_nope.dtype).
    """
    c, r = _latent_widths(q_nope, q_pe, kv_cache)
    out = torch.zeros(q_nope.shape, dtype=torch.float32, device=q_nope.device)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        kv_c, k_pe = _sequence_latents(kv_cache, block_table, b, length, kv_scale, c, r)
        out[b] = mla_attention_ref(q_nope[None, b : b + 1], q_pe[None, b : b + 1], kv_c, k_pe, softmax_scale,
                                   start_pos=length - 1)[0, 0]  # fmt: skip
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

    Args: q_nope [T, H, C], q_pe [T, H, R], the new tokens of all sequences back to back;
    query_start_loc [B + 1] int32 (sequence b's queries are rows [qsl[b], qsl[b+1])); seq_lens [B]
    int32, cached tokens *including* the new ones, which are the last ones. Query i of b sits at
    position seq_lens[b] - q_len[b] + i and sees positions 0..itself. Returns [T, H, C].
    """
    c, r = _latent_widths(q_nope, q_pe, kv_cache)
    out = torch.zeros(q_nope.shape, dtype=torch.float32, device=q_nope.device)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        if q1 - q0 > length:
            raise ValueError(f"sequence {b}: {q1 - q0} new tokens but seq_lens[{b}] = {length}")
        kv_c, k_pe = _sequence_latents(kv_cache, block_table, b, length, kv_scale, c, r)
        out[q0:q1] = mla_attention_ref(q_nope[None, q0:q1], q_pe[None, q0:q1], kv_c, k_pe, softmax_scale,
                                       start_pos=length - (q1 - q0))[0]  # fmt: skip
    return out.to(out_dtype or q_nope.dtype)
