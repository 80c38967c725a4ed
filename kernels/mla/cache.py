"""Paged latent KV cache for MLA: byte layouts, allocation and page gathering (pure torch).

One cache per layer: a pool of pages `[num_pages, page_size, W]`; a sequence owns the pages its row
of the block table `[batch, max_pages] int32` lists, and token `t` of that sequence lives in page
`block_table[b, t // page_size]`, slot `t % page_size`. Its flat slot index (what `cache_store`
takes) is `page * page_size + t % page_size`. Each token holds the MLA latent: kv_c (the RMS-normed
latent of C = kv_lora_rank values, also the value) and k_pe (the R rotary dims). The layouts hold
any C and R (fp8_ds: C a multiple of 128, R even); the functions take them as arguments, by default
DeepSeek-V3's C = 512, R = 64, for which the byte counts below are given and the Triton kernels are built.

The cache dtype is read from the buffer's torch dtype, so no separate flag can disagree with it:

    "bf16"    torch.bfloat16       [P, S, C + R]   1152 B/token: kv_c[0:C] | k_pe[C:C + R]
    "fp8"     torch.float8_e4m3fn  [P, S, C + R]    576 B/token: same order, every value
              quantized with ONE float32 per-tensor scale `kv_scale` (dequant: q * kv_scale), as
              vLLM/SGLang `--kv-cache-dtype fp8` with the layer's k_scale; the scale is static (a
              calibration figure or 1.0), not recomputed per token.
    "fp8_ds"  torch.uint8          [P, S, C + C/32 + 2R]   656 B/token, DeepSeek-V3.2 / FlashMLA layout:
              bytes [0, C)               kv_c as E4M3, C/128 groups of 128 values     ([  0, 512) at 512 + 64)
              bytes [C, C + C/32)        one float32 scale per group (dequant: q * scale)         ([512, 528))
              bytes [C + C/32, .. + 2R)  k_pe as R bfloat16 values, not quantized              ([528, 656))
              Scales are computed per token on store (dsquant.formats.fp8 per-token-group rule:
              amax floored at 1e-4, / 448, optional UE8M0 round-up). The row, C/128 * 132 + 2R bytes,
              is a multiple of 4 (R even), so the same buffer is viewed as float8 (values), float32
              (scales) and bfloat16 (rope) without copies; all little-endian. A C that is not a multiple
              of 128 has no fp8_ds layout (fp8_ds_offsets refuses it).

Pages that no block-table row references (or slots past a sequence's length) may hold anything,
NaN included: kernels never let those bytes reach an output.
"""

from __future__ import annotations

import torch

KV_LORA_RANK = 512
ROPE_DIM = 64
LATENT_DIM = KV_LORA_RANK + ROPE_DIM  # 576
DS_GROUP = 128  # fp8_ds: kv_c values per float32 scale

KV_DTYPES = ("bf16", "fp8", "fp8_ds")
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_ds": torch.uint8}


def fp8_ds_offsets(kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM) -> tuple[int, int, int]:
    """fp8_ds byte offsets (scales, rope part, row end) of a kv_lora_rank + rope_dim latent: (512, 528, 656)."""
    if kv_lora_rank < DS_GROUP or kv_lora_rank % DS_GROUP or rope_dim < 1 or rope_dim % 2:
        raise ValueError(
            f"fp8_ds: a {kv_lora_rank} + {rope_dim} latent has no fp8_ds layout (it needs kv_lora_rank a multiple of "
            f"{DS_GROUP}, one float32 scale per {DS_GROUP} values, and an even rope dim); use bf16 or fp8"
        )
    rope_offset = kv_lora_rank + 4 * (kv_lora_rank // DS_GROUP)
    return kv_lora_rank, rope_offset, rope_offset + 2 * rope_dim


DS_SCALE_OFFSET, DS_ROPE_OFFSET, DS_TOKEN_BYTES = fp8_ds_offsets()  # 512, 528, 656: DeepSeek-V3's layout


def token_width(kv_dtype: str, kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM) -> int:
    """Elements per token in a cache buffer (its last dim): C + R for bf16/fp8, the fp8_ds row's bytes."""
    if kv_dtype not in _TORCH_DTYPE:
        raise ValueError(f"kv_dtype: {kv_dtype!r} is not one of {KV_DTYPES}")
    return fp8_ds_offsets(kv_lora_rank, rope_dim)[2] if kv_dtype == "fp8_ds" else kv_lora_rank + rope_dim


def kv_cache_dtype(kv_cache: torch.Tensor, kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM) -> str:
    """Name of a cache buffer's layout ("bf16", "fp8", "fp8_ds"), from its torch dtype; checks its width
    against the kv_lora_rank + rope_dim latent it is meant to hold."""
    for name, dt in _TORCH_DTYPE.items():
        if kv_cache.dtype == dt:
            w = token_width(name, kv_lora_rank, rope_dim)
            if kv_cache.dim() != 3 or kv_cache.shape[-1] != w:
                raise ValueError(
                    f"kv_cache: a {name} cache of a {kv_lora_rank} + {rope_dim} latent is [num_pages, page_size, {w}],"
                    f" got {tuple(kv_cache.shape)}"
                )
            return name
    raise ValueError(f"kv_cache: dtype {kv_cache.dtype} is not a latent cache dtype (bf16, float8_e4m3fn, uint8)")


def kv_cache_bytes_per_token(kv_dtype: str, kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM) -> int:
    """Bytes one token takes in one layer's cache: 1152 (bf16), 576 (fp8), 656 (fp8_ds) at 512 + 64."""
    return token_width(kv_dtype, kv_lora_rank, rope_dim) * (2 if kv_dtype == "bf16" else 1)


def allocate_kv_cache(
    num_pages: int, page_size: int, kv_dtype: str = "bf16", device: torch.device | str | None = None, *,
    kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM,
) -> torch.Tensor:  # fmt: skip
    """One layer's page pool, zero-filled: bf16/fp8 [num_pages, page_size, 576], fp8_ds uint8 [.., 656]
    (at 512 + 64; token_width for others).

    For "fp8" keep a float32 scalar `kv_scale` beside it (1.0 when uncalibrated) and pass it to
    `cache_store`, `mla_decode` and `mla_prefill`.
    """
    width = token_width(kv_dtype, kv_lora_rank, rope_dim)
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"kv cache: num_pages={num_pages} and page_size={page_size} must be positive")
    return torch.zeros(num_pages, page_size, width, dtype=_TORCH_DTYPE[kv_dtype], device=device)


def slot_mapping_for(block_table: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor, page_size: int):
    """Flat cache slots [T] int64 for tokens at `positions` [T] of sequences `seq_ids` [T] (no host sync)."""
    pages = block_table[seq_ids.long(), positions.long() // page_size].long()
    return pages * page_size + positions.long() % page_size


def dequantize_kv_tokens(
    kv_cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None, *,
    kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM,
):  # fmt: skip
    """Read tokens at flat `slots` [N] back to float32: (kv_c [N, C], k_pe [N, R]).

    The dequantization every kernel must match: bf16 -> float32; fp8 -> q * kv_scale;
    fp8_ds -> q * scale[group] for kv_c and bf16 -> float32 for k_pe.
    """
    kind = kv_cache_dtype(kv_cache, kv_lora_rank, rope_dim)
    c = kv_lora_rank
    rows = kv_cache.reshape(-1, kv_cache.shape[-1])[slots.long()]  # [N, W]
    if kind == "bf16":
        x = rows.float()
    elif kind == "fp8":
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8 cache needs its float32 per-tensor scale")
        x = rows.float() * kv_scale.float()
    else:
        _, rope_offset, _ = fp8_ds_offsets(c, rope_dim)
        q = rows[:, :c].contiguous().view(torch.float8_e4m3fn).float()  # [N, C]
        scale = rows[:, c:rope_offset].contiguous().view(torch.float32)  # [N, C / 128]
        kv_c = (q.reshape(-1, c // DS_GROUP, DS_GROUP) * scale[:, :, None]).reshape(-1, c)
        k_pe = rows[:, rope_offset:].contiguous().view(torch.bfloat16).float()  # [N, R]
        return kv_c, k_pe
    return x[:, :c], x[:, c:]
