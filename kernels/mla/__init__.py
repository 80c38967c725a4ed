"""MLA attention over a paged, optionally FP8-quantized latent KV cache (DeepSeek-V3 absorbed form).

Layouts and allocation: cache.py. Kernels: store.py (quantize-on-store), triton.py (decode and
chunked prefill, split-KV + LSE merge; token_major.py and gluon_decode.py: decode over fp8 caches with the
tokens as the MMA rows, the latter in Gluon for Hopper). Pure-torch twins (the spec): reference.py.

Typical use, per layer and step (CUDA):
    cache = allocate_kv_cache(num_pages, page_size, "fp8_ds", device="cuda")
    cache_store(kv_c, k_pe, cache, slot_mapping)                         # new tokens
    out = mla_decode(q_nope_absorbed, q_pe, cache, block_table, seq_lens, softmax_scale)
    out = mla_prefill(q_nope_absorbed, q_pe, cache, block_table, seq_lens, query_start_loc, softmax_scale)
The Triton-backed names load on first use, so the references import without triton.
"""

from dsquant.kernels._lazy import lazy_exports
from dsquant.kernels.mla.cache import (
    KV_DTYPES,
    allocate_kv_cache,
    dequantize_kv_tokens,
    kv_cache_bytes_per_token,
    kv_cache_dtype,
    slot_mapping_for,
)
from dsquant.kernels.mla.reference import cache_store_ref, mla_decode_ref, mla_prefill_ref

__getattr__, __dir__ = lazy_exports(__name__, {"cache_store": "store", "mla_decode": "triton", "mla_prefill": "triton"})

__all__ = [
    "KV_DTYPES",
    "allocate_kv_cache",
    "kv_cache_bytes_per_token",
    "kv_cache_dtype",
    "slot_mapping_for",
    "dequantize_kv_tokens",
    "cache_store",
    "cache_store_ref",
    "mla_decode",
    "mla_decode_ref",
    "mla_prefill",
    "mla_prefill_ref",
]
