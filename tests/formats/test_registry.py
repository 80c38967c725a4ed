"""The format registry agrees with the format modules it names: dtypes, shapes, scales and dequantization."""

import pytest
import torch
from dsquant.kernels import format_codes

from dsquant.formats import registry
from dsquant.formats.weight import QuantizedWeight

W = (0.05 * torch.randn(256, 512, generator=torch.Generator().manual_seed(0))).bfloat16()
WRITTEN = [name for name, f in registry.FORMATS.items() if f.quantize is not None]


@pytest.mark.parametrize("name", WRITTEN)
def test_entry_describes_what_its_quantizer_returns(name):
    f = registry.get(name)
    q, scale, *glob = f.quantize(W)
    assert q.dtype == f.element and tuple(q.shape) == f.stored_shape(tuple(W.shape))
    assert scale.dtype == f.scale and tuple(scale.shape) == f.scale_shape(tuple(W.shape))
    assert bool(glob) == f.has_global_scale
    assert f.logical_shape(tuple(q.shape)) == tuple(W.shape)


@pytest.mark.parametrize("name", WRITTEN)
def test_weight_dequantizes_with_its_format_module(name):
    f = registry.get(name)
    qw = QuantizedWeight(name, *f.quantize(W))
    assert qw.shape == tuple(W.shape) and qw.act == f.act
    module = __import__(f"dsquant.formats.{name.split('-')[0]}", fromlist=["_"])
    reference = getattr(module, f"dequantize_{name.replace('-', '_')}")
    args = (qw.scale,) if qw.global_scale is None else (qw.scale, qw.global_scale)
    assert torch.equal(qw.dequantize(torch.float32), reference(qw.q, *args, dtype=torch.float32))


def test_kernel_codes_map_back_to_their_entries():
    for code in (format_codes.BF16, format_codes.FP8_BLOCK, format_codes.INT8, format_codes.NVFP4, format_codes.MXFP4):
        assert registry.of_kernel_code(code).kernel_code == code
    with pytest.raises(ValueError, match="no format"):
        registry.of_kernel_code(format_codes.FP8_DS)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="fp8-block"):
        registry.get("fp8_block")
    with pytest.raises(ValueError, match="unknown format"):
        QuantizedWeight("fp4", W)


def test_module_marks_are_names_their_convention_writes():
    for name, convention in registry.MODULE_MARKS:
        assert any(name in lay.names.values() for lay in registry.CONVENTIONS[convention].layouts.values()), name


@pytest.mark.parametrize(
    "qc, v4, want",
    [
        ({"quant_method": "fp8"}, False, "deepseek"),
        ({"quant_method": "fp8"}, True, "deepseek-v4"),
        ({"quant_method": "modelopt_fp4"}, True, "modelopt"),
        ({"quantization": {"quant_algo": "NVFP4"}}, False, "modelopt"),
        ({"quant_method": "compressed-tensors"}, True, "compressed-tensors"),
        ({"quant_method": "gptq"}, False, None),
        (None, False, None),
    ],
)
def test_convention_of_reads_the_declared_method(qc, v4, want):
    assert registry.convention_of(qc, strict=False, v4=v4) == want
