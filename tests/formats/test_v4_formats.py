"""DeepSeek-V4's stored formats (deepseek-v4.md 1.4-1.5): F8_E8M0 scales and FP4 experts packed in I8, read by
dsquant.formats bit for bit as independent decoders read them (ml_dtypes, torch's float8_e8m0fnu, transformers'
Fp8Dequantize)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from dsquant.formats.fp8 import dequantize_fp8_block, quantize_fp8_block
from dsquant.formats.mxfp4 import dequantize_mxfp4, e8m0_from_float, e8m0_to_float
from dsquant.formats.ondisk import read_quantized

E8M0 = torch.float8_e8m0fnu
QC = {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}


def test_e8m0_bytes_decode_as_ml_dtypes_and_torch_do():
    b = torch.arange(256, dtype=torch.uint8)
    ours = e8m0_to_float(b.view(E8M0)).numpy()
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)  # NaN at 255 compares equal to NaN here
    np.testing.assert_array_equal(ours, b.view(E8M0).float().numpy())
    assert np.isnan(ours[255]) and ours[127] == 1.0 and ours[0] == 2.0**-127


def test_e8m0_from_float_is_exact_and_refuses_other_values():
    s = torch.tensor([2.0**-126, 2.0**-20, 0.5, 1.0, 2.0**127])
    assert torch.equal(e8m0_from_float(s).float(), s)
    assert e8m0_from_float(s).view(torch.uint8).tolist() == [1, 107, 126, 127, 254]
    for bad in (0.75, 0.0, -1.0, float("inf"), 2.0**-130):
        with pytest.raises(ValueError, match="not positive normal powers of two"):
            e8m0_from_float(torch.tensor([1.0, bad]))


def test_packed_fp4_even_element_in_the_low_nibble():
    # byte 0x2F: low nibble 0xF = -6 (element 0), high 0x2 = +1 (element 1); byte 0xA2 (int8 -94): low 0x2 = +1,
    # high 0xA = -1; scale byte 126 = 0.5
    packed = torch.tensor([[0x2F, 0xA2 - 256]], dtype=torch.int8).repeat(1, 8)
    scale = torch.tensor([[126]], dtype=torch.uint8).view(E8M0)
    got = dequantize_mxfp4(packed, scale, torch.float32)
    assert got[0, :4].tolist() == [-3.0, 0.5, 0.5, -0.5]


def _transformers_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(hf_quantizer=None)._dequantize_one(q, scale, output_dtype=torch.bfloat16)


def test_packed_fp4_matches_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (64, 128), generator=g, dtype=torch.int8)
    packed[0] = torch.arange(-128, 0, dtype=torch.int8)  # every byte value appears
    packed[1] = torch.arange(0, 128, dtype=torch.int8)
    scale = torch.randint(100, 150, (64, 256 // 32), generator=g, dtype=torch.uint8).view(E8M0)
    ours = dequantize_mxfp4(packed, scale, torch.bfloat16)
    assert torch.equal(ours, _transformers_dequantize(packed, scale))


@pytest.mark.parametrize("e8m0", [True, False])
def test_fp8_with_v4_grids_matches_transformers_bit_for_bit(e8m0):
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.02
    q, scale = quantize_fp8_block(w, ue8m0=True)
    stored = e8m0_from_float(scale) if e8m0 else scale
    ours = dequantize_fp8_block(q, stored, dtype=torch.bfloat16)
    assert torch.equal(ours, _transformers_dequantize(q, stored))
    assert torch.equal(ours, dequantize_fp8_block(q, scale, dtype=torch.bfloat16))


def test_read_quantized_understands_v4_scale_names():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    q, scale = quantize_fp8_block(w, ue8m0=True)
    qw = read_quantized("layers.0.attn.wq_a", {"layers.0.attn.wq_a.weight": q,
                                               "layers.0.attn.wq_a.scale": e8m0_from_float(scale)}, QC)
    assert qw.fmt == "fp8-block" and torch.equal(qw.scale, scale)
    packed = torch.randint(-128, 128, (128, 128), dtype=torch.int8)
    s = torch.full((128, 8), 120, dtype=torch.uint8)
    qw = read_quantized("e", {"e.weight": packed, "e.scale": s.view(E8M0)}, QC)
    assert qw.fmt == "mxfp4" and qw.shape == (128, 256) and torch.equal(qw.scale, s)
    with pytest.raises(ValueError, match="e: weight torch.int8 .* with scale torch.float32 .* neither"):
        read_quantized("e", {"e.weight": packed, "e.scale": s.float()}, QC)
