"""Quantizers and dequantizers for every format dsquant writes: Triton kernels, bit-identical to reference.py.

    quantize_fp8_per_token(x, ue8m0=False)
    quantize_fp8_per_token_group(x, group_size=128, ue8m0=False, column_major_scales=False)
    silu_mul_quantize_fp8(gate_up, group_size=128, ue8m0=False, column_major_scales=False)
    quantize_int8_per_token(x)
    quantize_fp8_block(w, ue8m0=False) / dequantize_fp8_block(q, scale, dtype=torch.bfloat16)
    quantize_nvfp4(x, global_scale=None) / dequantize_nvfp4(packed, block_scale, global_scale, dtype)
    quantize_mxfp4(x, scale_rule="ocp") / dequantize_mxfp4(packed, scale, dtype)

Each has a pure-torch twin `<name>_ref` in dsquant.kernels.quant.reference (CPU, no Triton). The kernels are
imported on first use, so the references stay importable where Triton is not installed. Inputs must be
finite: dsquant.formats raises ValueError on NaN/Inf, the kernels do not look (that would cost a host sync
per call), so callers that take user tensors (convert) check first with dsquant.formats._checks.check_finite.
Compare kernel output with the references evaluated on CPU tensors: torch on CUDA divides by a Python
scalar through its reciprocal, so the references run on CUDA tensors can differ in the last bit.
"""

from __future__ import annotations

from dsquant.kernels._lazy import lazy_exports

_HOME = {
    "quantize_fp8_per_token": "triton",
    "quantize_fp8_per_token_group": "triton",
    "silu_mul_quantize_fp8": "triton",
    "quantize_int8_per_token": "triton",
    "quantize_fp8_block": "triton",
    "dequantize_fp8_block": "triton",
    "quantize_nvfp4": "triton_fp4",
    "dequantize_nvfp4": "triton_fp4",
    "quantize_mxfp4": "triton_fp4",
    "dequantize_mxfp4": "triton_fp4",
}
__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
