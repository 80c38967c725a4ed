"""QuantLinear: a linear layer that executes its weight in the stored format (the runner's one GEMM seam).

Formats (`fmt`, dsquant.formats.registry) and the activation scheme each implies (`act`, the format's default
there), after what the serving engines run:
    bf16       y = x @ W^T                                       act "none"
    fp8-block  W float8_e4m3fn [N, K] * scale [N/128, K/128]     act "fp8_group": dynamic 1x128 FP8 (DeepSeek)
    fp8-channel W float8_e4m3fn [N, K] * scale [N, 1]            act "fp8_token": dynamic per-token FP8, or
                                                                 "fp8_tensor": per-tensor FP8 (static with
                                                                 the input_scale, else dynamic)
    int8       W int8 [N, K] * scale [N, 1]                      act "int8_token": dynamic per-token INT8
    nvfp4      W packed uint8 [N, K/2], block e4m3 [N, K/16],    act "nvfp4": NVFP4 with the calibrated
               global scale []                                   input global scale (dynamic when absent)
    mxfp4      W packed uint8 [N, K/2], E8M0 scale [N, K/32]     act "none" (W4A16) or "mxfp4" (W4A4)
Any format may also run weight-only (act "none") when its checkpoint declares no input activations; a
compressed-tensors module's act comes from its own config group (dsquant.runner.schemes).
Every scale multiplies (dsquant.formats convention); on-disk names are resolved in load.py.

impl="reference" (CPU): the activation is quantized and dequantized with dsquant.formats and the weight
is dequantized for this call only, then one float32 matmul: the exact numerics of a W8A8/W4A4 kernel up
to fp32 summation order, and never a dequantized copy of the whole model. impl="triton" (CUDA) runs the
dsquant.kernels.quant activation quantizers and dsquant.kernels.gemm scaled-mm kernels (linear_triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsquant.formats.fp8 import (
    dequantize_fp8,
    dequantize_fp8_per_token_group,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
    quantize_fp8_per_token_group,
)
from dsquant.formats.int8 import quantize_int8_per_token
from dsquant.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from dsquant.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from dsquant.formats.weight import QuantizedWeight
from dsquant.kernels import format_codes
from dsquant.runner.ops import kernels_can_run


def _fp8_group(x, input_scale):
    return dequantize_fp8_per_token_group(*quantize_fp8_per_token_group(x, name="activation"), dtype=torch.float32)


def _fp8_token(x, input_scale):
    return dequantize_fp8(*quantize_fp8_per_token(x, name="activation"), dtype=torch.float32)


def _fp8_tensor(x, input_scale):
    return dequantize_fp8(*quantize_fp8_per_tensor(x, name="activation", scale=input_scale), dtype=torch.float32)


def _int8_token(x, input_scale):
    q, s = quantize_int8_per_token(x, name="activation")
    return q.float() * s


def _nvfp4(x, input_scale):
    return dequantize_nvfp4(*quantize_nvfp4(x, input_scale, name="activation"), dtype=torch.float32)


def _mxfp4(x, input_scale):
    return dequantize_mxfp4(*quantize_mxfp4(x, name="activation"), dtype=torch.float32)


# Activation scheme (dsquant.formats.registry.ACTS) -> quantize then dequantize with dsquant.formats.
_FAKE_QUANT = {"none": lambda x, input_scale: x.float(), "fp8_group": _fp8_group, "fp8_token": _fp8_token,
               "fp8_tensor": _fp8_tensor, "int8_token": _int8_token, "nvfp4": _nvfp4, "mxfp4": _mxfp4}


def fake_quant_activation(x: torch.Tensor, act: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> float32 [M, K]: the values a quantized-activation kernel multiplies (codes * scales)."""
    return _FAKE_QUANT[act](x, input_scale)


def linear_ref(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype with the format's numerics (see module docstring)."""
    if not w.format.quantized and w.act == "none":
        return F.linear(x, w.q.to(x.dtype))
    x2 = x.reshape(-1, x.shape[-1])
    xf = fake_quant_activation(x2, w.act, w.input_scale)
    y = xf @ w.dequantize(torch.float32).t()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def linear_triton(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """CUDA: the activation quantizer and scaled-mm kernels of dsquant.kernels.quant / .gemm for the format.

    FP8-block and INT8 run W8A8 on quantized codes; NVFP4 (W4A4) quantizes and dequantizes the activation
    with its input global scale and feeds the bf16 result to the W4A16 NVFP4 GEMM (Hopper has no FP4 MMA;
    the bf16 rounding of that product is the one difference from linear_ref); MXFP4 is weight-only.
    """
    from dsquant.kernels import gemm, quant

    x2 = x.reshape(-1, x.shape[-1])
    code = w.format.kernel_code
    if code == format_codes.FP8_BLOCK and w.act == "fp8_group":
        a, a_scale = quant.quantize_fp8_per_token_group(x2)
        y = gemm.fp8_block_gemm(a, a_scale, w.q, w.scale, out_dtype=x.dtype)
    elif code == format_codes.INT8 and w.act == "int8_token":
        a, a_scale = quant.quantize_int8_per_token(x2)
        y = gemm.int8_scaled_mm(a, a_scale, w.q, w.scale, out_dtype=x.dtype)
    elif code == format_codes.NVFP4:
        xa = fake_quant_activation(x2, w.act, w.input_scale).to(torch.bfloat16)
        y = gemm.nvfp4_gemm(xa, w.q, w.scale, w.global_scale, out_dtype=x.dtype)
    elif code == format_codes.MXFP4 and w.act == "none":
        y = gemm.mxfp4_gemm(x2.to(torch.bfloat16), w.q, w.scale, out_dtype=x.dtype)
    else:
        return linear_ref(x, w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class QuantLinear(nn.Module):
    """A linear whose weight stays in its checkpoint format; filled by load.py (or init for training)."""

    def __init__(self, in_features: int, out_features: int, impl: str = "reference"):
        super().__init__()
        self.in_features, self.out_features, self.impl = in_features, out_features, impl
        self.w: QuantizedWeight | None = None
        self.weight: torch.Tensor | None = None  # the trainable/bf16 weight, also w.q for fmt bf16

    def set_weight(self, w: QuantizedWeight, name: str = "linear") -> None:
        n, k = w.shape
        if (n, k) != (self.out_features, self.in_features):
            raise ValueError(f"{name}: weight shape {(n, k)} != expected {(self.out_features, self.in_features)}")
        if w.act == "fp8_group" and k % 128:
            raise ValueError(f"{name}: FP8 1x128 activations need in_features % 128 == 0, got {k}")
        self.w = w
        self.weight = None if w.format.quantized else w.q

    def dense_weight(self) -> torch.Tensor:
        """The [N, K] weight as float32, dequantized for this call (for products a plain linear cannot express)."""
        return self.weight.float() if self.w is None else self.w.dequantize(torch.float32)

    def init_trainable(self, std: float, generator: torch.Generator | None = None) -> None:
        """Random float32 nn.Parameter weight (demo training); forward then uses F.linear."""
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features, generator=generator) * std)
        self.w = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            return F.linear(x, self.weight.to(x.dtype))
        if self.impl == "triton" and self.w.format.quantized and kernels_can_run(x):
            return linear_triton(x, self.w)
        return linear_ref(x, self.w)

    def _apply(self, fn, recurse=True):
        """Move the stored-format tensors with .to()/.cuda() like parameters."""
        super()._apply(fn, recurse)
        if self.w is not None:  # keep the stored dtypes: .to(dtype) must not turn fp8 codes into bf16
            self.w = self.w.apply(lambda t: fn(t).to(t.dtype))
            if not self.w.format.quantized:
                self.weight = self.w.q
        return self

    def extra_repr(self) -> str:
        fmt = self.w.fmt if self.w is not None else "trainable"
        return f"in={self.in_features}, out={self.out_features}, fmt={fmt}, impl={self.impl}"
