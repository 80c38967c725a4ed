"""Scaled-mm GEMMs: out[M, N] = x[M, K] @ W[N, K]^T with quantized operands.

    fp8_block_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, out=None)
    fp8_block_gemm_gluon(...)  the same, warp-specialized in Gluon for Hopper (gluon_fp8.py)
    int8_scaled_mm(a, a_scale, b, b_scale, bias=None, out_dtype=torch.bfloat16, out=None)
    nvfp4_gemm(x, w_packed, w_block_scale, w_global_scale, out_dtype=torch.bfloat16, out=None)
    mxfp4_gemm(x, w_packed, w_scale_e8m0, out_dtype=torch.bfloat16, out=None)

Each has a pure-torch twin `<name>_ref` (reference.py, the spec). The kernels are imported on first
use, so the references stay importable where Triton is not installed. Design notes: README.md.
"""

from __future__ import annotations

from dsquant.kernels._lazy import lazy_exports

_HOME = {
    "fp8_block_gemm": "triton",
    "fp8_block_gemm_gluon": "gluon_fp8",
    "int8_scaled_mm": "triton",
    "nvfp4_gemm": "triton_fp4",
    "mxfp4_gemm": "triton_fp4",
    "fp8_block_gemm_ref": "reference",
    "int8_scaled_mm_ref": "reference",
    "nvfp4_gemm_ref": "reference",
    "mxfp4_gemm_ref": "reference",
}
__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
