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


def kernels_can_run(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter (TRITON_INTERPRET=1),
    which is how the CPU tests exercise the impl="triton" path."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class KernelOps:
    """The small kernels a decoder layer needs, chosen once by `impl`."""

    def __init__(self, impl: str = "reference"):
        if impl not in ("reference", "triton"):
            raise ValueError(f"impl must be 'reference' or 'triton', got {impl!r}")
        self.impl = impl

    def use_kernels(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernel runs: impl="triton" and `x` where kernels run (else the reference).
        The kernels are imported where they run, so that triton loads only when one is about to."""
        return self.impl == "triton" and kernels_can_run(x)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.use_kernels(x):
            from dsquant.kernels.norm.triton import rms_norm

            return rms_norm(x, weight, eps)
        return rms_norm_ref(x, weight, eps)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        if self.use_kernels(x):
            from dsquant.kernels.norm.triton import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, weight, eps)
        return fused_add_rms_norm_ref(x, residual, weight, eps)

    def apply_rope(self, q_pe, k_pe, cos, sin, positions) -> None:
        if self.use_kernels(q_pe):
            from dsquant.kernels.rope.triton import apply_rope

            apply_rope(q_pe, k_pe, cos, sin, positions)
        else:
            apply_rope_ref(q_pe, k_pe, cos, sin, positions)

    def sample(self, probs, top_k, top_p, uniform) -> torch.Tensor:
        if self.use_kernels(probs):
            from dsquant.kernels.sample.triton import top_k_top_p_sample

            return top_k_top_p_sample(probs, top_k, top_p, uniform)
        return top_k_top_p_sample_ref(probs, top_k, top_p, uniform)
