"""Scaled-mm GEMMs: out[M, N] = x[M, K] @ W[N, K]^T with quantized operands.

reference.py holds the pure-torch spec (`*_ref`, importable without a GPU); triton.py and
triton_fp4.py the kernels. Importing this package imports Triton.
"""

from dsquant.kernels.gemm.reference import fp8_block_gemm_ref, int8_scaled_mm_ref, mxfp4_gemm_ref, nvfp4_gemm_ref
from dsquant.kernels.gemm.triton import fp8_block_gemm, int8_scaled_mm
from dsquant.kernels.gemm.triton_fp4 import mxfp4_gemm, nvfp4_gemm

__all__ = [
    "fp8_block_gemm", "int8_scaled_mm", "nvfp4_gemm", "mxfp4_gemm",
    "fp8_block_gemm_ref", "int8_scaled_mm_ref", "nvfp4_gemm_ref", "mxfp4_gemm_ref",
]
