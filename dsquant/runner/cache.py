"""Paged latent KV cache for the runner's MLA (prefill windows in eval, prefill + decode in generate).

Layouts, store and read are dsquant.kernels.mla's (cache.py there), at the model's widths: per layer a
pool [num_pages, page_size, W] holding the normed latent kv_c (C = kv_lora_rank) and the roped key k_pe
(R = qk_rope_head_dim), in one of its KV_DTYPES: "bf16"; "fp8", E4M3 codes of x / kv_scale with one
float32 per-tensor kv_scale: the cache-wide value (1.0 uncalibrated, as vLLM uses without a checkpoint
k_scale) unless the layer's checkpoint carries its own k_scale, which the MLA module hands to its
LayerCache (`use_scale`) before storing, so every store and read of that layer uses it; "fp8_ds", the
per-token group-scaled layout (C a multiple of 128). Sequence b owns the pages of row b of the block
table. On CUDA with impl="triton" and DeepSeek's 512 + 64 latent, storing and attention run the MLA
kernels (cache_store, mla_prefill, mla_decode); otherwise their references (cache_store_ref,
dequantize_kv_tokens, mla_attention_ref).
"""

from __future__ import annotations

import torch

from dsquant.kernels.mla.cache import (
    KV_DTYPES,
    KV_LORA_RANK,
    ROPE_DIM,
    allocate_kv_cache,
    dequantize_kv_tokens,
    slot_mapping_for,
)
from dsquant.kernels.mla.reference import cache_store_ref, mla_attention_ref
from dsquant.runner.ops import kernels_can_run


class LayerCache:
    """One layer's page pool, sharing the block table of its PagedLatentCache."""

    def __init__(self, parent: PagedLatentCache, pool: torch.Tensor):
        self.parent, self.pool = parent, pool
        self._scale: torch.Tensor | None = None  # this layer's checkpoint k_scale, when it has one

    def use_scale(self, k_scale: torch.Tensor | None) -> None:
        """Use this layer's stored FP8 scale (float32 []) instead of the cache-wide one; None keeps that."""
        if k_scale is not None:
            self._scale = k_scale.to(device=self.pool.device, dtype=torch.float32).reshape(())

    @property
    def kv_scale(self) -> torch.Tensor:
        return self._scale if self._scale is not None else self.parent.kv_scale

    def _fp8_scale(self) -> torch.Tensor | None:
        """The per-tensor scale the store and read take: an "fp8" cache's, None for the other layouts."""
        return self.kv_scale if self.parent.kv_dtype == "fp8" else None

    def _slots(self, start: int, stop: int) -> torch.Tensor:
        """Flat slots [B, stop - start] of positions start..stop-1 of every sequence."""
        p, b, n = self.parent, self.parent.block_table.shape[0], stop - start
        seqs = torch.arange(b, device=self.pool.device).repeat_interleave(n)
        pos = torch.arange(start, stop, device=self.pool.device).repeat(b)
        return slot_mapping_for(p.block_table, pos, seqs, p.page_size).view(b, n)

    def store(self, kv_c: torch.Tensor, k_pe: torch.Tensor, start_pos: int) -> None:
        """Write kv_c [B, S, C] and k_pe [B, S, R] at positions start_pos.. (quantized on store for fp8)."""
        b, s, c = kv_c.shape
        slots = self._slots(start_pos, start_pos + s).flatten()
        kv_c, k_pe = kv_c.reshape(b * s, c), k_pe.reshape(b * s, -1)
        if self.parent.use_kernels(kv_c):
            from dsquant.kernels.mla.store import cache_store

            cache_store(kv_c.contiguous(), k_pe.contiguous(), self.pool, slots, self._fp8_scale())
        else:
            cache_store_ref(kv_c, k_pe, self.pool, slots, self._fp8_scale())

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized float32 (kv_c [B, T, C], k_pe [B, T, R]) of positions 0..length-1."""
        p = self.parent
        slots = self._slots(0, length)  # [B, T]
        kv, pe = dequantize_kv_tokens(self.pool, slots.flatten(), self._fp8_scale(), kv_lora_rank=p.kv_lora_rank,
                                      rope_dim=p.rope_dim)  # fmt: skip
        return kv.view(*slots.shape, -1), pe.view(*slots.shape, -1)

    def attend(self, q_lat: torch.Tensor, q_pe: torch.Tensor, start_pos: int, scale: float,
               keep: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Causal attention of q_lat [B, S, H, C] / q_pe [B, S, H, R] at positions start_pos.. over the
        cache (already holding them) -> float32 [B, S, H, C]; keep [B, S, T] bool narrows it (sparse attention,
        run by the reference: the MLA kernels attend densely)."""
        b, s, h, c = q_lat.shape
        p = self.parent
        if p.use_kernels(q_lat) and keep is None:
            from dsquant.kernels.mla.triton import mla_decode, mla_prefill

            seq_lens = torch.full((b,), start_pos + s, dtype=torch.int32, device=q_lat.device)
            ql, qp = q_lat.to(torch.bfloat16), q_pe.to(torch.bfloat16)
            if s == 1:
                out = mla_decode(ql[:, 0], qp[:, 0], self.pool, p.block_table, seq_lens, scale, self._fp8_scale(),
                                 out_dtype=torch.float32)  # fmt: skip
                return out[:, None]
            qsl = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q_lat.device)
            out = mla_prefill(ql.reshape(b * s, h, c), qp.reshape(b * s, h, -1), self.pool, p.block_table,
                              seq_lens, qsl, scale, self._fp8_scale(), out_dtype=torch.float32)  # fmt: skip
            return out.view(b, s, h, c)
        kv, pe = self.read(start_pos + s)
        return mla_attention_ref(q_lat, q_pe, kv, pe, scale, start_pos, keep)


class PagedLatentCache:
    """Latent caches of every decoder layer for `batch` sequences of up to `max_len` tokens."""

    def __init__(
        self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, *,
        kv_dtype: str = "bf16", page_size: int = 64, device: str | torch.device = "cpu", impl: str = "reference",
        kv_scale: float = 1.0,
    ):  # fmt: skip
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"--kv-cache: {kv_dtype!r} is not one of {KV_DTYPES}")
        self.kv_dtype, self.page_size, self.impl = kv_dtype, page_size, impl
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        pages = -(-max_len // page_size)
        self.block_table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
        self.kv_scale = torch.tensor(kv_scale, dtype=torch.float32, device=device)
        try:
            self.layers = [
                LayerCache(self, allocate_kv_cache(batch * pages, page_size, kv_dtype, device,
                                                   kv_lora_rank=kv_lora_rank, rope_dim=rope_dim))  # fmt: skip
                for _ in range(n_layers)
            ]
        except ValueError as exc:
            raise ValueError(f"--kv-cache {kv_dtype}: {exc}") from None

    def use_kernels(self, x: torch.Tensor) -> bool:
        """The MLA kernels serve DeepSeek's 512 + 64 latent on CUDA under impl="triton"."""
        return (self.impl == "triton" and kernels_can_run(x)
                and (self.kv_lora_rank, self.rope_dim) == (KV_LORA_RANK, ROPE_DIM))  # fmt: skip

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    @property
    def nbytes(self) -> int:
        return sum(c.pool.numel() * c.pool.element_size() for c in self.layers)
