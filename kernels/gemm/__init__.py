"""Scaled-mm GEMMs: out[M, N] = x[M, K] @ W[N, K]^T with quantized operands.

    fp8_block_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, out=None)
    fp8_block_gemm_gluon(...)  the same, warp-specialized in Gluon for Hopper (gluon_fp8.py)
    int8_scaled_mm(a, a_scale, b, b_scale, bias=None, out_dtype=torch.bfloat16, out=None)
    nvfp4_gemm(x, w_packed, w_block_scale, w_global_scale, out_dtype=torch.bfloat16, out=None)
    mxfp4_gemm(x, w_packed, w_scale_e8m0, out_dtype=torch.bfloat16, out=None)
    to_mma_layout(w_packed, w_scale, global_scale=None)  an NVFP4 / MXFP4 weight rearranged once, at load time,
        for w4a16_gemm (fp4_mma_layout.py)
    w4a16_gemm(x, weight, out_dtype=torch.bfloat16, out=None)  M <= 64 tokens x such a weight (triton_w4a16.py)

Each has a pure-torch twin `<name>_ref` (reference.py, the spec). The kernels are imported on first
use, so the references stay importable where Triton is not installed. Design notes: README.md.
"""

from __future__ import annotations

from dsquant.kernels._lazy import lazy_exports

_HOME = {
    "fp8_block_gemm": "gluon_fp8",
    "fp8_block_gemm_gluon": "gluon_fp8",
    "int8_scaled_mm": "triton",
    "nvfp4_gemm": "triton_fp4",
    "mxfp4_gemm": "triton_fp4",
    "to_mma_layout": "fp4_mma_layout",
    "w4a16_gemm": "triton_w4a16",
    "fp8_block_gemm_ref": "reference",
    "int8_scaled_mm_ref": "reference",
    "nvfp4_gemm_ref": "reference",
    "mxfp4_gemm_ref": "reference",
    "w4a16_gemm_ref": "reference",
}
__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
