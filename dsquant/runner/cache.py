"""Paged latent KV cache for the runner's MLA (prefill windows in eval, prefill + decode in generate).

Layout and numerics are dsquant.kernels.mla.cache's: per layer a pool [num_pages, page_size, C + R]
holding the normed latent kv_c (C = kv_lora_rank) then the roped key k_pe (R = qk_rope_head_dim);
"bf16" stores bfloat16, "fp8" stores E4M3 codes of x / kv_scale with one float32 per-tensor kv_scale:
the cache-wide value (1.0 uncalibrated, as vLLM uses without a checkpoint k_scale) unless the layer's
checkpoint carries its own k_scale, which the MLA module hands to its LayerCache (`use_scale`) before
storing, so every store and read of that layer uses it. Sequence b owns the pages of row b of
the block table. On CUDA with impl="triton" and DeepSeek's 512 + 64 latent, storing and attention go
through the MLA kernels (cache_store, mla_prefill, mla_decode); otherwise the torch path below, which
follows the same store / dequantize arithmetic as the kernels' references.
"""

from __future__ import annotations

import torch

from dsquant.formats.fp8 import FP8_DTYPE, FP8_E4M3_MAX
from dsquant.kernels.mla import KV_DTYPES, slot_mapping_for
from dsquant.runner.ops import kernels_can_run, mla_attention_ref

# The layouts of the MLA kernels that hold any latent width; fp8_ds (per-128 scales) is DeepSeek's 512 + 64 only.
KV_CACHE_DTYPES = tuple(d for d in KV_DTYPES if d != "fp8_ds")
_TORCH = {"bf16": torch.bfloat16, "fp8": FP8_DTYPE}


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
        if self.parent.use_kernels(kv_c):
            from dsquant.kernels.mla import cache_store

            kv_scale = self.kv_scale if self.parent.kv_dtype == "fp8" else None
            cache_store(kv_c.reshape(b * s, c).contiguous(), k_pe.reshape(b * s, -1).contiguous(), self.pool, slots,
                        kv_scale)
            return
        x = torch.cat([kv_c, k_pe], dim=-1).reshape(b * s, -1).float()
        flat = self.pool.view(-1, self.pool.shape[-1])
        if self.parent.kv_dtype == "fp8":
            flat[slots] = (x / self.kv_scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
        else:
            flat[slots] = x.to(torch.bfloat16)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized float32 (kv_c [B, T, C], k_pe [B, T, R]) of positions 0..length-1."""
        rows = self.pool.view(-1, self.pool.shape[-1])[self._slots(0, length)].float()  # [B, T, C + R]
        if self.parent.kv_dtype == "fp8":
            rows = rows * self.kv_scale
        c = self.parent.kv_lora_rank
        return rows[..., :c], rows[..., c:]

    def attend(self, q_lat: torch.Tensor, q_pe: torch.Tensor, start_pos: int, scale: float,
               keep: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Causal attention of q_lat [B, S, H, C] / q_pe [B, S, H, R] at positions start_pos.. over the
        cache (already holding them) -> float32 [B, S, H, C]; keep [B, S, T] bool narrows it (sparse attention,
        run by the torch path: the MLA kernels attend densely)."""
        b, s, h, c = q_lat.shape
        p = self.parent
        if p.use_kernels(q_lat) and keep is None:
            from dsquant.kernels.mla import mla_decode, mla_prefill

            kv_scale = self.kv_scale if p.kv_dtype == "fp8" else None
            seq_lens = torch.full((b,), start_pos + s, dtype=torch.int32, device=q_lat.device)
            ql, qp = q_lat.to(torch.bfloat16), q_pe.to(torch.bfloat16)
            if s == 1:
                out = mla_decode(ql[:, 0], qp[:, 0], self.pool, p.block_table, seq_lens, scale, kv_scale,
                                 out_dtype=torch.float32)  # fmt: skip
                return out[:, None]
            qsl = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q_lat.device)
            out = mla_prefill(ql.reshape(b * s, h, c), qp.reshape(b * s, h, -1), self.pool, p.block_table,
                              seq_lens, qsl, scale, kv_scale, out_dtype=torch.float32)  # fmt: skip
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
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache: {kv_dtype!r} is not one of {KV_CACHE_DTYPES}")
        self.kv_dtype, self.page_size, self.impl = kv_dtype, page_size, impl
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        pages = -(-max_len // page_size)
        self.block_table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
        self.kv_scale = torch.tensor(kv_scale, dtype=torch.float32, device=device)
        width = kv_lora_rank + rope_dim
        self.layers = [
            LayerCache(self, torch.zeros(batch * pages, page_size, width, dtype=_TORCH[kv_dtype], device=device))
            for _ in range(n_layers)
        ]

    def use_kernels(self, x: torch.Tensor) -> bool:
        """The MLA kernels serve DeepSeek's 512 + 64 latent on CUDA under impl="triton"."""
        return self.impl == "triton" and kernels_can_run(x) and (self.kv_lora_rank, self.rope_dim) == (512, 64)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    @property
    def nbytes(self) -> int:
        return sum(c.pool.numel() * c.pool.element_size() for c in self.layers)
