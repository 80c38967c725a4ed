"""KernelOps: the runner's seam between the model and its kernels (one object per model, no globals).

impl="reference" uses the pure-torch twins (CPU, and the spec); impl="triton" uses the Triton kernels of
dsquant.kernels.{norm,rope,sample} when the inputs are where kernels run (kernels_can_run), and the
reference otherwise; the latent cache (cache.py) and the MoE (model.py) pick their kernels the same way.
Linears dispatch in QuantLinear (linear.py).
"""

from __future__ import annotations

import os

import torch

from dsquant.kernels.norm.reference import fused_add_rms_norm_ref, rms_norm_ref
from dsquant.kernels.rope.reference import apply_rope_ref
from dsquant.kernels.sample.reference import top_k_top_p_sample_ref


def mla_attention_ref(
    q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, scale: float, start_pos: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention over latent keys/values (DeepSeek-V3 `MLA.forward`, attn_impl="absorb").

    Args:
        q_lat: [B, S, H, C] queries already multiplied by the nope half of kv_b_proj (C = kv_lora_rank).
        q_pe:  [B, S, H, R] rotated rope part of the queries.
        kv:    [B, T, C] normalised latent cache rows for positions 0..T-1 (T = start_pos + S).
        pe:    [B, T, R] rotated rope keys.
        keep:  optional bool [B, S, T], the keys each query may read besides causality (V3.2's indexer).
    Returns:
        [B, S, H, C] float32 attention output in latent space (the caller applies the v half of kv_b_proj).
    """
    s, t = q_lat.shape[1], kv.shape[1]
    scores = torch.einsum("bshc,btc->bsht", q_lat.float(), kv.float())
    scores = scores + torch.einsum("bshr,btr->bsht", q_pe.float(), pe.float())
    scores = scores * scale
    qpos = torch.arange(start_pos, start_pos + s, device=kv.device)
    mask = (torch.arange(t, device=kv.device)[None, :] > qpos[:, None])[None]  # [1, S, T] future keys
    if keep is not None:
        mask = mask | ~keep
    scores = scores.masked_fill(mask[:, :, None, :], float("-inf"))
    return torch.einsum("bsht,btc->bshc", scores.softmax(dim=-1), kv.float())


def kernels_can_run(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter (TRITON_INTERPRET=1),
    which is how the CPU tests exercise the impl="triton" path."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_kernels() -> dict[str, object]:
    """The Triton twins of the references above, by name; imported on first use, so that triton loads only
    when a kernel is about to run."""
    from dsquant.kernels.norm.triton import fused_add_rms_norm, rms_norm
    from dsquant.kernels.rope.triton import apply_rope
    from dsquant.kernels.sample.triton import top_k_top_p_sample

    return {"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm, "apply_rope": apply_rope,
            "top_k_top_p_sample": top_k_top_p_sample}


class KernelOps:
    """The small kernels a decoder layer needs, chosen once by `impl`."""

    def __init__(self, impl: str = "reference"):
        if impl not in ("reference", "triton"):
            raise ValueError(f"impl must be 'reference' or 'triton', got {impl!r}")
        self.impl = impl
        self._triton: dict[str, object] | None = None

    def _kernel(self, name: str, x: torch.Tensor):
        """The Triton kernel `name` when impl="triton" and `x` is where kernels run, else None (the reference)."""
        if self.impl != "triton" or not kernels_can_run(x):
            return None
        if self._triton is None:
            self._triton = _triton_kernels()
        return self._triton[name]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        fn = self._kernel("rms_norm", x)
        return (fn or rms_norm_ref)(x, weight, eps)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        fn = self._kernel("fused_add_rms_norm", x)
        return (fn or fused_add_rms_norm_ref)(x, residual, weight, eps)

    def apply_rope(self, q_pe, k_pe, cos, sin, positions) -> None:
        fn = self._kernel("apply_rope", q_pe)
        (fn or apply_rope_ref)(q_pe, k_pe, cos, sin, positions)

    def mla_attention(self, q_lat, q_pe, kv, pe, scale: float, start_pos: int, keep=None) -> torch.Tensor:
        return mla_attention_ref(q_lat, q_pe, kv, pe, scale, start_pos, keep)

    def sample(self, probs, top_k, top_p, uniform) -> torch.Tensor:
        fn = self._kernel("top_k_top_p_sample", probs)
        return (fn or top_k_top_p_sample_ref)(probs, top_k, top_p, uniform)
