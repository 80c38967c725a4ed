"""MXFP4 -> NVFP4 / FP8-block transcoding: values kept bit for bit where the target can hold them."""

from __future__ import annotations

import pytest
import torch

from dsquant.formats import dequantize_mxfp4, dequantize_nvfp4, quantize_nvfp4
from dsquant.formats.fp8 import dequantize_fp8_block
from dsquant.formats.transcode import mxfp4_to_fp8_block, mxfp4_to_nvfp4, nvfp4_shared_exponent


def mx_tensor(n: int, k: int, exponents: torch.Tensor, seed: int = 0):
    """Random nibbles with the given unbiased block exponents [n, k/32]."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    return packed, (exponents + 127).to(torch.uint8)


def e4m3_pow2_bits(d: torch.Tensor) -> torch.Tensor:
    """E4M3 bit pattern of 2^d written out from the encoding (bias 7; subnormals m * 2^-9)."""
    return torch.where(d >= -6, (d + 7) << 3, 1 << (d + 9).clamp(min=0)).to(torch.uint8)


def test_mxfp4_to_nvfp4_copies_nibbles_and_writes_power_of_two_scales():
    g = torch.Generator().manual_seed(1)
    exps = torch.randint(-17, 1, (64, 8), generator=g) - 4  # spread of 17 binades: every block in range
    packed, scale = mx_tensor(64, 256, exps)
    out, bs, gs, ex = mxfp4_to_nvfp4(packed, scale)
    m = int(exps.max()) - 8
    assert torch.equal(out, packed)
    assert gs.item() == 2.0**m
    assert torch.equal(bs.view(torch.uint8), e4m3_pow2_bits((exps - m).repeat_interleave(2, dim=-1)))
    assert (ex.exact_blocks, ex.total_blocks, ex.max_abs_error) == (64 * 8, 64 * 8, 0.0)
    assert torch.equal(dequantize_nvfp4(out, bs, gs, torch.float32), dequantize_mxfp4(packed, scale, torch.float32))


def test_mxfp4_to_nvfp4_requantizes_blocks_below_the_e4m3_range():
    exps = torch.zeros(4, 4, dtype=torch.int64)
    exps[1, 2] = -12  # k - m = -12 - (0 - 8) = -4: in range
    exps[2, 3] = -20  # -12: below 2^-9, re-quantized (and lost: E4M3 cannot scale it)
    packed, scale = mx_tensor(4, 128, exps)
    scale[3, 1] = 0  # an all-zero block's byte
    packed[3, 16:32] = 0
    out, bs, gs, ex = mxfp4_to_nvfp4(packed, scale)
    values = dequantize_mxfp4(packed, scale, torch.float32)
    rq_packed, rq_scale, _ = quantize_nvfp4(values, gs)
    assert torch.equal(out[2, 48:64], rq_packed[2, 48:64])
    assert torch.equal(bs[2, 6:8].view(torch.uint8), rq_scale[2, 6:8].view(torch.uint8))
    kept = torch.ones(4, 128 // 2, dtype=torch.bool)
    kept[2, 48:64] = False
    assert torch.equal(out[kept], packed[kept])
    after = dequantize_nvfp4(out, bs, gs, torch.float32)
    lost = values[2, 96:128]
    assert ex.total_blocks == 16
    assert ex.exact_blocks == 16 - int(bool((lost != after[2, 96:128]).any()))
    assert ex.max_abs_error == (values - after).abs().max().item()
    assert torch.equal(after[3, 32:64], torch.zeros(32))


def test_fused_partners_share_the_exponent():
    packed, s1 = mx_tensor(2, 64, torch.tensor([[-3, -1], [-5, -2]]))
    _, s3 = mx_tensor(2, 64, torch.tensor([[2, -1], [-5, -2]]))
    assert nvfp4_shared_exponent(s1, s3) == 2 - 8
    _, _, gs, _ = mxfp4_to_nvfp4(packed, s1, nvfp4_shared_exponent(s1, s3))
    assert gs.item() == 2.0 ** (2 - 8)


def test_e8m0_storage_dtypes_and_nan_byte():
    packed, scale = mx_tensor(2, 64, torch.tensor([[-3, -1], [-5, -2]]))
    ref = mxfp4_to_nvfp4(packed, scale)
    via = mxfp4_to_nvfp4(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu))
    assert torch.equal(ref[0], via[0]) and ref[2].item() == via[2].item()
    assert torch.equal(ref[1].view(torch.uint8), via[1].view(torch.uint8))
    scale[0, 0] = 255
    with pytest.raises(ValueError, match="experts.0.w1.*255"):
        mxfp4_to_nvfp4(packed, scale, name="experts.0.w1")
    with pytest.raises(ValueError, match="255"):
        mxfp4_to_fp8_block(packed, scale)


def test_mxfp4_to_fp8_block_is_exact_within_the_e4m3_span():
    g = torch.Generator().manual_seed(2)
    exps = torch.randint(-13, 1, (256, 8), generator=g) - 3
    packed, scale = mx_tensor(256, 256, exps)
    q, bs, ex = mxfp4_to_fp8_block(packed, scale)
    assert q.dtype == torch.float8_e4m3fn and bs.shape == (2, 2)
    mant = bs.view(torch.int32) & 0x7FFFFF
    assert torch.equal(mant, torch.zeros_like(mant))  # powers of two
    values = dequantize_mxfp4(packed, scale, torch.float32)
    assert torch.equal(dequantize_fp8_block(q, bs, dtype=torch.float32), values)
    assert (ex.exact_blocks, ex.total_blocks, ex.max_abs_error) == (256 * 8, 256 * 8, 0.0)


def test_mxfp4_to_fp8_block_counts_blocks_past_the_span():
    exps = torch.zeros(128, 4, dtype=torch.int64)
    exps[5, 1] = -20  # 20 binades under the block's largest: below E4M3's subnormal step
    packed, scale = mx_tensor(128, 128, exps)
    packed[5, 16:32] = 0x11  # every value of that block is 0.5 * 2^-20: nonzero
    q, bs, ex = mxfp4_to_fp8_block(packed, scale)
    values = dequantize_mxfp4(packed, scale, torch.float32)
    after = dequantize_fp8_block(q, bs, dtype=torch.float32)
    assert ex.total_blocks == 128 * 4 and ex.exact_blocks == 128 * 4 - 1
    assert ex.max_abs_error == (values - after).abs().max().item() > 0
    assert torch.equal(after[:5], values[:5]) and torch.equal(after[6:], values[6:])
