"""Pure-torch twins of the quant kernels: the spec they match bit for bit (runs on CPU, imports only torch).

Every function here calls dsquant.formats (the numerics spec) and only adds the layouts the kernels
offer on top of it (column-major scales, the fused SiLU-and-mul). Same names as triton.py plus `_ref`,
same signatures, same return order. Inputs must be finite: dsquant.formats raises ValueError on
NaN/Inf, while the kernels do not check (that would cost a host sync per call).
"""

from __future__ import annotations

import torch

from dsquant.formats import fp8 as _fp8
from dsquant.formats import int8 as _int8
from dsquant.formats import mxfp4 as _mxfp4
from dsquant.formats import nvfp4 as _nvfp4

__all__ = [
    "quantize_fp8_per_token_ref",
    "quantize_fp8_per_token_group_ref",
    "quantize_int8_per_token_ref",
    "quantize_fp8_block_ref",
    "dequantize_fp8_block_ref",
    "quantize_nvfp4_ref",
    "dequantize_nvfp4_ref",
    "quantize_mxfp4_ref",
    "dequantize_mxfp4_ref",
    "silu_mul_quantize_fp8_ref",
]


def quantize_fp8_per_token_ref(x: torch.Tensor, ue8m0: bool = False):
    """x [..., K] -> (q float8_e4m3fn [..., K]; scale float32 [..., 1])."""
    return _fp8.quantize_fp8_per_token(x, ue8m0=ue8m0)


def to_column_major(scale: torch.Tensor) -> torch.Tensor:
    """Scales [M, G] -> the same values in a contiguous [G, M] buffer, returned as its [M, G] view.

    torch._scaled_mm (block scaling) and DeepGEMM take 1x128 activation scales in this layout.
    """
    return scale.t().contiguous().t()


def quantize_fp8_per_token_group_ref(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False, column_major_scales: bool = False
):
    """x [..., K] -> (q float8_e4m3fn [..., K]; scale float32 [..., K // group_size]).

    column_major_scales (2-D x only): scale is the [M, G] view of a contiguous [G, M] buffer.
    """
    q, scale = _fp8.quantize_fp8_per_token_group(x, group_size, ue8m0=ue8m0)
    if column_major_scales:
        assert x.dim() == 2, f"column-major scales need a 2-D input, got shape {tuple(x.shape)}"
        scale = to_column_major(scale)
    return q, scale


def quantize_int8_per_token_ref(x: torch.Tensor):
    """x [..., K] -> (q int8 [..., K]; scale float32 [..., 1])."""
    return _int8.quantize_int8_per_token(x)


def quantize_fp8_block_ref(w: torch.Tensor, ue8m0: bool = False):
    """w [N, K] -> (q float8_e4m3fn [N, K]; scale float32 [ceil(N/128), ceil(K/128)])."""
    return _fp8.quantize_fp8_block(w, ue8m0=ue8m0)


def dequantize_fp8_block_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """q float8_e4m3fn [N, K], scale float32 [ceil(N/128), ceil(K/128)] -> dtype [N, K]."""
    return _fp8.dequantize_fp8_block(q, scale, dtype=dtype)


def quantize_nvfp4_ref(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    """x [..., K] -> (packed uint8 [..., K/2]; block_scale float8_e4m3fn [..., K/16]; global_scale float32 [])."""
    return _nvfp4.quantize_nvfp4(x, global_scale)


def dequantize_nvfp4_ref(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
):
    """(packed uint8 [..., K/2], block_scale e4m3 [..., K/16], global_scale float32 []) -> dtype [..., K]."""
    return _nvfp4.dequantize_nvfp4(packed, block_scale, global_scale, dtype)


def quantize_mxfp4_ref(x: torch.Tensor, scale_rule: str = "ocp"):
    """x [..., K] -> (packed uint8 [..., K/2]; scale E8M0 uint8 [..., K/32])."""
    return _mxfp4.quantize_mxfp4(x, scale_rule=scale_rule)


def dequantize_mxfp4_ref(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """(packed uint8 [..., K/2], scale E8M0 uint8 [..., K/32]) -> dtype [..., K]."""
    return _mxfp4.dequantize_mxfp4(packed, scale, dtype)


def silu_mul_bf16_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2*I] (gate first, up second) -> bfloat16 [M, I].

    SiLU(gate) * up is computed in float32 as gate / (1 + exp(-gate)) * up (torch's silu), then
    rounded once to bfloat16: the MoE down-projection input is a bf16 activation, and quantizing
    that bf16 value is what makes the fused kernel's codes comparable with an unfused pipeline.
    """
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter].float(), gate_up[..., inter:].float()
    return (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)


def silu_mul_quantize_fp8_ref(
    gate_up: torch.Tensor, group_size: int = 128, ue8m0: bool = False, column_major_scales: bool = False
):
    """gate_up [M, 2*I] -> (q float8_e4m3fn [M, I]; scale float32 [M, I // group_size]).

    bf16(SiLU(gate) * up in float32) (see silu_mul_bf16_ref), then 1 x group_size FP8 quantization
    with the options of quantize_fp8_per_token_group_ref.
    """
    assert gate_up.shape[-1] % 2 == 0, f"gate_up last dim {gate_up.shape[-1]} must be even (gate | up)"
    return quantize_fp8_per_token_group_ref(silu_mul_bf16_ref(gate_up), group_size, ue8m0, column_major_scales)
