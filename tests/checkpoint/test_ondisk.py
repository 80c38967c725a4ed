"""dsquant.formats.ondisk: names and scale directions per convention, write -> read round trip."""

from __future__ import annotations

import pytest
import torch

from dsquant import formats
from dsquant.formats.ondisk import (
    DEFAULT_NVFP4_INPUT_SCALE,
    read_quantized,
    stored_specs,
    tensor_names,
    write_quantized,
)
from dsquant.formats.registry import convention_of
from dsquant.formats.weight import QuantizedWeight

W = (0.02 * torch.randn(256, 512, generator=torch.Generator().manual_seed(0))).bfloat16()
QC = {"deepseek": {"quant_method": "fp8"}, "modelopt": {"quant_method": "modelopt", "quant_algo": "NVFP4"},
      "compressed-tensors": {"quant_method": "compressed-tensors"}}


def _quantized(fmt: str) -> QuantizedWeight:
    if fmt == "fp8-block":
        return QuantizedWeight(fmt, *formats.quantize_fp8_block(W))
    if fmt == "int8":
        return QuantizedWeight(fmt, *formats.quantize_int8_per_channel(W))
    if fmt == "nvfp4":
        q, s, g = formats.quantize_nvfp4(W)
        return QuantizedWeight(fmt, q, s, g, torch.tensor(0.5))
    return QuantizedWeight(fmt, *formats.quantize_mxfp4(W))


CASES = [("deepseek", "fp8-block"), ("compressed-tensors", "fp8-block"), ("compressed-tensors", "int8"),
         ("modelopt", "nvfp4"), ("compressed-tensors", "nvfp4"), ("compressed-tensors", "mxfp4")]


@pytest.mark.parametrize("convention,fmt", CASES)
def test_write_then_read_round_trips(convention, fmt):
    qw = _quantized(fmt)
    tensors = write_quantized("m.proj", qw, convention)
    specs = stored_specs(convention, fmt, "m.proj", (256, 512), torch.bfloat16)
    assert [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()] == [(n, d, tuple(s)) for n, d, s in specs]
    back = read_quantized("m.proj", tensors, QC[convention])
    assert back.fmt == fmt and back.shape == (256, 512)
    assert torch.equal(back.dequantize(torch.float32), qw.dequantize(torch.float32))


def test_scale_directions_differ_by_convention():
    qw = _quantized("nvfp4")
    mo = write_quantized("m", qw, "modelopt")
    ct = write_quantized("m", qw, "compressed-tensors")
    assert torch.equal(mo["m.weight_scale_2"], qw.global_scale) and mo["m.input_scale"] == 0.5
    assert torch.equal(ct["m.weight_global_scale"], (1.0 / qw.global_scale).reshape(1))  # a divisor
    assert ct["m.input_global_scale"].item() == 2.0
    assert torch.equal(mo["m.weight"], ct["m.weight_packed"]) and torch.equal(mo["m.weight_scale"].view(torch.uint8),
                                                                           ct["m.weight_scale"].view(torch.uint8))
    no_input = QuantizedWeight("nvfp4", qw.q, qw.scale, qw.global_scale)
    assert write_quantized("m", no_input, "modelopt")["m.input_scale"] == DEFAULT_NVFP4_INPUT_SCALE
    assert tensor_names("deepseek", "fp8-block", "m")["scale"] == "m.weight_scale_inv"


def test_read_excluded_and_nested_modelopt_config():
    assert read_quantized("m", {"m.weight": W}, QC["modelopt"]).fmt == "bf16"
    nested = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}}
    assert convention_of(nested) == "modelopt" and convention_of(None) is None
    tensors = write_quantized("m", _quantized("nvfp4"), "modelopt")
    assert read_quantized("m", tensors, nested).fmt == "nvfp4"


def test_errors_name_the_module():
    with pytest.raises(ValueError, match="quant_method 'gptq' is not one dsquant reads"):
        convention_of({"quant_method": "gptq"})
    with pytest.raises(ValueError, match="m: no tensor m.weight"):
        read_quantized("m", {}, None)
    q, _ = formats.quantize_fp8_block(W)
    with pytest.raises(ValueError, match="m: 1-byte weight .* without the scale tensors"):
        read_quantized("m", {"m.weight": q}, QC["deepseek"])
    with pytest.raises(ValueError, match="format 'int8' cannot be stored in the modelopt convention"):
        tensor_names("modelopt", "int8", "m")
