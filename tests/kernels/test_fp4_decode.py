"""The in-register E2M1 decode (dsquant.kernels.fp4_decode) against dsquant.formats, bit for bit.

Every byte value (two codes) meets every scale the formats can store: all finite non-negative E4M3
values (NVFP4) and all 256 E8M0 bytes (MXFP4, 2^-127 .. 2^127 and Inf at 255, where 0 x Inf is a NaN
with the hardware's payload). Under TRITON_INTERPRET=1 this runs the float32 path; on the GPU (-m gpu)
the PTX path.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from dsquant.kernels.fp4_decode import e2m1_pairs_bf16, e8m0_to_bf16
from dsquant.kernels.testing import assert_exact

from dsquant.formats.fp4 import e2m1_to_float, unpack_fp4
from dsquant.formats.mxfp4 import e8m0_to_float


@triton.jit
def _decode_kernel(p_ptr, s_ptr, out_ptr, C: tl.constexpr, E8M0: tl.constexpr):
    """Row r: C packed bytes with one scale byte each -> 2C bf16 values (even codes, then odd, interleaved)."""
    r = tl.program_id(0)
    c = tl.arange(0, C)
    p = tl.load(p_ptr + r * C + c)
    s = tl.load(s_ptr + r * C + c)
    scale = e8m0_to_bf16(s) if E8M0 else s.to(tl.bfloat16)
    even, odd = e2m1_pairs_bf16(p, scale)
    tl.store(out_ptr + r * 2 * C + 2 * c, even)
    tl.store(out_ptr + r * 2 * C + 2 * c + 1, odd)


def _decode(packed: torch.Tensor, scale: torch.Tensor, e8m0: bool) -> torch.Tensor:
    rows, c = packed.shape
    out = torch.empty((rows, 2 * c), dtype=torch.bfloat16, device=packed.device)
    _decode_kernel[(rows,)](packed, scale, out, C=c, E8M0=e8m0)
    return out


def _expected(packed: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """The spec: E2M1 value x scale in float32 (exact), rounded once to bf16 (exact too)."""
    values = e2m1_to_float(unpack_fp4(packed.cpu()))
    return (values * scale_f32.cpu().repeat_interleave(2, dim=-1)).to(torch.bfloat16)


def _all_bytes(rows: int, device: str) -> torch.Tensor:
    """[rows, 256]: every byte value in every row, shuffled differently per row (lane order must not matter)."""
    g = torch.Generator().manual_seed(rows)
    return torch.stack([torch.randperm(256, generator=g) for _ in range(rows)]).to(torch.uint8).to(device)


def _check_e4m3(device: str) -> None:
    e4m3 = torch.arange(0x7F, dtype=torch.uint8)  # 0x00..0x7E: every finite non-negative E4M3 (0x7F is NaN)
    packed = _all_bytes(e4m3.numel(), device)
    scale = e4m3[:, None].expand(-1, 256).contiguous().view(torch.float8_e4m3fn).to(device)
    got = _decode(packed, scale, e8m0=False)
    assert_exact(got, _expected(packed, scale.float()), "NVFP4 decode, E4M3 scales")


def _check_e8m0(device: str) -> None:
    e8m0 = torch.arange(256, dtype=torch.uint8)
    packed = _all_bytes(e8m0.numel(), device)
    scale = e8m0[:, None].expand(-1, 256).contiguous().to(device)
    got, want = _decode(packed, scale, e8m0=True).cpu(), _expected(packed, e8m0_to_float(scale))
    # Byte 255 is NaN (the MX format's definition): every value it scales is NaN, with the hardware's payload.
    assert_exact(got[:255], want[:255], "MXFP4 decode, E8M0 scales 0..254")
    assert torch.equal(got[255].float().isnan(), want[255].float().isnan()), "MXFP4 decode, E8M0 255: NaN pattern"
    assert torch.equal(got[255].float().nan_to_num(0.0), want[255].float().nan_to_num(0.0)), "MXFP4 decode, E8M0 255"


def _check_mixed_scales(device: str) -> None:
    """A different scale per byte: the four bytes of one PTX block must each keep their own scale."""
    g = torch.Generator().manual_seed(7)
    packed = torch.randint(0, 256, (64, 128), generator=g, dtype=torch.uint8).to(device)
    e4m3 = torch.randint(0, 0x7F, (64, 128), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)
    assert_exact(_decode(packed, e4m3, e8m0=False), _expected(packed, e4m3.float()), "per-byte E4M3 scales")


def test_e2m1_decode_every_byte_every_e4m3_scale():
    _check_e4m3("cpu")


def test_e2m1_decode_every_byte_every_e8m0_scale():
    _check_e8m0("cpu")


def test_e2m1_decode_per_byte_scales():
    _check_mixed_scales("cpu")


def test_e2m1_decode_nan_scale_gives_nan():
    packed = _all_bytes(1, "cpu")
    scale = torch.full((1, 256), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.isnan(_decode(packed, scale, e8m0=False).float()).all()


@pytest.mark.gpu
def test_e2m1_decode_ptx_path_gpu():
    _check_e4m3("cuda")
    _check_e8m0("cuda")
    _check_mixed_scales("cuda")
    scale = torch.full((1, 256), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).cuda()
    assert torch.isnan(_decode(_all_bytes(1, "cuda"), scale, e8m0=False).float()).all()
