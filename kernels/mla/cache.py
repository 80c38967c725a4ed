"""Paged latent KV cache for MLA: byte layouts, allocation and page gathering (pure torch).

One cache per layer: a pool of pages `[num_pages, page_size, W]`; a sequence owns the pages its row
of the block table `[batch, max_pages] int32` lists, and token `t` of that sequence lives in page
`block_table[b, t // page_size]`, slot `t % page_size`. Its flat slot index (what `cache_store`
takes) is `page * page_size + t % page_size`. Each token holds the 576-wide MLA latent: kv_c (the
RMS-normed `kv_lora_rank` = 512 latent, also the value) and k_pe (the 64 rotary dims).

The cache dtype is read from the buffer's torch dtype, so no separate flag can disagree with it:

    "bf16"    torch.bfloat16       [P, S, 576]   1152 B/token: kv_c[0:512] | k_pe[512:576]
    "fp8"     torch.float8_e4m3fn  [P, S, 576]    576 B/token: same order, every value
              quantized with ONE float32 per-tensor scale `kv_scale` (dequant: q * kv_scale), as
              vLLM/SGLang `--kv-cache-dtype fp8` with the layer's k_scale; the scale is static (a
              calibration figure or 1.0), not recomputed per token.
    "fp8_ds"  torch.uint8          [P, S, 656]    656 B/token, DeepSeek-V3.2 / FlashMLA layout:
              bytes [  0, 512)  kv_c as E4M3, 4 groups of 128 values
              bytes [512, 528)  4 float32 scales, one per 128-value group (dequant: q * scale)
              bytes [528, 656)  k_pe as 64 bfloat16 values, not quantized
              Scales are computed per token on store (dsquant.formats.fp8 per-token-group rule:
              amax floored at 1e-4, / 448, optional UE8M0 round-up). 656 is a multiple of 4, so
              the same buffer is viewed as float8 (values), float32 (scales) and bfloat16 (rope)
              without copies; all little-endian.

Pages that no block-table row references (or slots past a sequence's length) may hold anything,
NaN included: kernels never let those bytes reach an output.
"""

from __future__ import annotations

import torch

KV_LORA_RANK = 512
ROPE_DIM = 64
LATENT_DIM = KV_LORA_RANK + ROPE_DIM  # 576
DS_GROUP = 128  # fp8_ds: kv_c values per float32 scale
DS_SCALE_OFFSET = KV_LORA_RANK  # byte offset of the 4 scales
DS_ROPE_OFFSET = KV_LORA_RANK + 4 * (KV_LORA_RANK // DS_GROUP)  # 528: byte offset of the bf16 rope part
DS_TOKEN_BYTES = DS_ROPE_OFFSET + 2 * ROPE_DIM  # 656

KV_DTYPES = ("bf16", "fp8", "fp8_ds")
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_ds": torch.uint8}
_WIDTH = {"bf16": LATENT_DIM, "fp8": LATENT_DIM, "fp8_ds": DS_TOKEN_BYTES}


def kv_cache_dtype(kv_cache: torch.Tensor) -> str:
    """Name of a cache buffer's layout ("bf16", "fp8", "fp8_ds"), from its torch dtype and width."""
    for name, dt in _TORCH_DTYPE.items():
        if kv_cache.dtype == dt:
            if kv_cache.dim() != 3 or kv_cache.shape[-1] != _WIDTH[name]:
                raise ValueError(
                    f"kv_cache: a {name} cache is [num_pages, page_size, {_WIDTH[name]}], got {tuple(kv_cache.shape)}"
                )
            return name
    raise ValueError(f"kv_cache: dtype {kv_cache.dtype} is not a latent cache dtype (bf16, float8_e4m3fn, uint8)")


def kv_cache_bytes_per_token(kv_dtype: str) -> int:
    """Bytes one token takes in one layer's cache: 1152 (bf16), 576 (fp8), 656 (fp8_ds)."""
    if kv_dtype not in _TORCH_DTYPE:
        raise ValueError(f"kv_dtype: {kv_dtype!r} is not one of {KV_DTYPES}")
    return _WIDTH[kv_dtype] * (2 if kv_dtype == "bf16" else 1)


def allocate_kv_cache(
    num_pages: int, page_size: int, kv_dtype: str = "bf16", device: torch.device | str | None = None
) -> torch.Tensor:
    """One layer's page pool, zero-filled: bf16/fp8 [num_pages, page_size, 576], fp8_ds uint8 [.., 656].

    For "fp8" keep a float32 scalar `kv_scale` beside it (1.0 when uncalibrated) and pass it to
    `cache_store`, `mla_decode` and `mla_prefill`.
    """
    if kv_dtype not in _TORCH_DTYPE:
        raise ValueError(f"kv_dtype: {kv_dtype!r} is not one of {KV_DTYPES}")
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"kv cache: num_pages={num_pages} and page_size={page_size} must be positive")
    return torch.zeros(num_pages, page_size, _WIDTH[kv_dtype], dtype=_TORCH_DTYPE[kv_dtype], device=device)


def slot_mapping_for(block_table: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor, page_size: int):
    """Flat cache slots [T] int64 for tokens at `positions` [T] of sequences `seq_ids` [T] (no host sync)."""
    pages = block_table[seq_ids.long(), positions.long() // page_size].long()
    return pages * page_size + positions.long() % page_size


def dequantize_kv_tokens(kv_cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None):
    """Read tokens at flat `slots` [N] back to float32: (kv_c [N, 512], k_pe [N, 64]).

    The dequantization every kernel must match: bf16 -> float32; fp8 -> q * kv_scale;
    fp8_ds -> q * scale[group] for kv_c and bf16 -> float32 for k_pe.
    """
    kind = kv_cache_dtype(kv_cache)
    rows = kv_cache.reshape(-1, kv_cache.shape[-1])[slots.long()]  # [N, W]
    if kind == "bf16":
        x = rows.float()
    elif kind == "fp8":
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8 cache needs its float32 per-tensor scale")
        x = rows.float() * kv_scale.float()
    else:
        q = rows[:, :KV_LORA_RANK].contiguous().view(torch.float8_e4m3fn).float()  # [N, 512]
        scale = rows[:, DS_SCALE_OFFSET:DS_ROPE_OFFSET].contiguous().view(torch.float32)  # [N, 4]
        kv_c = (q.reshape(-1, KV_LORA_RANK // DS_GROUP, DS_GROUP) * scale[:, :, None]).reshape(-1, KV_LORA_RANK)
        k_pe = rows[:, DS_ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()  # [N, 64]
        return kv_c, k_pe
    return x[:, :KV_LORA_RANK], x[:, KV_LORA_RANK:]
