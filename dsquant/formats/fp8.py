"""FP8 E4M3 (`torch.float8_e4m3fn`) quantization: per-tensor, per-token, per-token-group and 128x128 blocks.

Elements: E4M3 "fn" (no Inf; max finite 448; 0x7F/0xFF are NaN).

Scale (every granularity), a float32 multiplier that dequantizes (`x ~= q * scale`):
    amax  = max(|x|) over the group, clamped to >= 1e-4   (DeepSeek `act_quant`, DeepGEMM
                                                         `per_block_cast_to_fp8`)
    scale = amax / 448
    ue8m0 option (`scale_fmt: "ue8m0"`, DeepSeek-V3.1/V3.2): scale rounded *up* to a power of two
          by its bits (exponent + 1 when any mantissa bit is set), still stored as float32.
Quantize: q = clamp(x_fp32 / scale, -448, 448) cast to E4M3 with round-to-nearest-even. The
division (not a multiply by 1/scale) is part of the spec: kernels do the same so codes agree
bit for bit.

Granularities:
    per-tensor       scale []                      (KV cache, simple baselines)
    per-token        scale [..., 1]                over the last dim
    per-token-group  scale [..., K // 128]         1x128 activation groups; K % 128 == 0
    block            scale [ceil(N/128), ceil(K/128)]  128x128 weight blocks; partial edge blocks
                     (e.g. 2112 = 16.5 x 128 rows) take their amax over the real elements only,
                     as if zero-padded (DeepSeek README_WEIGHTS).

On disk (DeepSeek native, `quant_method: "fp8"`): `<name>.weight` float8_e4m3fn [N, K] and
`<name>.weight_scale_inv` float32 [ceil(N/128), ceil(K/128)]; despite the name, it multiplies.
Zero blocks get the floor scale 1e-4/448 and zero codes. NaN/Inf input raises ValueError.
"""

from __future__ import annotations

import torch

from dsquant.formats._checks import check_divisible, check_finite, div_ieee

FP8_E4M3_MAX = 448.0
FP8_BLOCK = 128
FP8_AMAX_FLOOR = 1e-4
FP8_DTYPE = torch.float8_e4m3fn


def ceil_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to a power of two, exactly (bit manipulation, no log2)."""
    bits = scale.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def fp8_scale(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """amax (any shape) -> float32 dequantization scale per group."""
    scale = div_ieee(amax.float().clamp(min=FP8_AMAX_FLOOR), FP8_E4M3_MAX)
    return ceil_to_ue8m0(scale) if ue8m0 else scale


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def quantize_fp8_per_tensor(
    x: torch.Tensor, *, ue8m0: bool = False, name: str = "tensor", scale: torch.Tensor | None = None
):
    """x (any shape) -> (q float8_e4m3fn, same shape; scale float32 []); `scale` given: a static scale, used as is."""
    check_finite(x, name)
    scale = fp8_scale(x.abs().amax().float(), ue8m0) if scale is None else scale.float().reshape(())
    return _cast(x, scale), scale


def quantize_fp8_per_token(x: torch.Tensor, *, ue8m0: bool = False, name: str = "tensor"):
    """x [..., K] -> (q float8_e4m3fn [..., K]; scale float32 [..., 1])."""
    check_finite(x, name)
    scale = fp8_scale(x.abs().amax(dim=-1, keepdim=True), ue8m0)
    return _cast(x, scale), scale


def quantize_fp8_per_token_group(
    x: torch.Tensor, group_size: int = FP8_BLOCK, *, ue8m0: bool = False, name: str = "tensor"
):
    """x [..., K] -> (q float8_e4m3fn [..., K]; scale float32 [..., K // group_size], row-major)."""
    check_finite(x, name)
    k = x.shape[-1]
    check_divisible(k, group_size, "last dim", name)
    xg = x.float().reshape(*x.shape[:-1], k // group_size, group_size)  # [..., G, group]
    scale = fp8_scale(xg.abs().amax(dim=-1), ue8m0)  # [..., G]
    q = _cast(xg, scale.unsqueeze(-1)).reshape(x.shape)
    return q, scale


def dequantize_fp8_per_token_group(
    q: torch.Tensor, scale: torch.Tensor, group_size: int = FP8_BLOCK, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of quantize_fp8_per_token_group: q [..., K], scale [..., K // group_size] -> dtype [..., K]."""
    k = q.shape[-1]
    xg = q.float().reshape(*q.shape[:-1], k // group_size, group_size) * scale.float().unsqueeze(-1)
    return xg.reshape(q.shape).to(dtype)


def _block_view(w: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> float32 [ceil(N/b), b, ceil(K/b), b], zero-padded at the ragged edges."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    wf = w.float()
    if n % block or k % block:
        wf = torch.nn.functional.pad(wf, (0, kb * block - k, 0, nb * block - n))
    return wf.reshape(nb, block, kb, block)


def quantize_fp8_block(w: torch.Tensor, block_size: int = FP8_BLOCK, *, ue8m0: bool = False, name: str = "tensor"):
    """w [N, K] -> (q float8_e4m3fn [N, K]; scale float32 [ceil(N/128), ceil(K/128)])."""
    assert w.dim() == 2, f"{name}: block quantization needs a 2-D weight, got shape {tuple(w.shape)}"
    check_finite(w, name)
    n, k = w.shape
    wb = _block_view(w, block_size)  # [NB, b, KB, b]
    scale = fp8_scale(wb.abs().amax(dim=(1, 3)), ue8m0)  # [NB, KB]
    q = _cast(wb, scale[:, None, :, None])
    q = q.reshape(scale.shape[0] * block_size, scale.shape[1] * block_size)[:n, :k].contiguous()
    return q, scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block_size: int = FP8_BLOCK) -> torch.Tensor:
    """Block scales [NB, KB] -> per-element float32 [N, K] (cropped at ragged edges)."""
    n, k = shape
    return scale.float().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :k]


def dequantize_fp8_block(
    q: torch.Tensor, scale: torch.Tensor, block_size: int = FP8_BLOCK, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """DeepSeek native FP8 block weight -> dtype: W[i, j] = float(q[i, j]) * scale[i // 128, j // 128]."""
    n, k = q.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(f"block scale shape {tuple(scale.shape)} does not fit weight {(n, k)}: expected {(nb, kb)}")
    if n % block_size == 0 and k % block_size == 0:  # the same float32 products, broadcast instead of expanded
        qb = q.float().reshape(nb, block_size, kb, block_size)
        return (qb * scale.float()[:, None, :, None]).view(n, k).to(dtype)
    return (q.float() * expand_block_scale(scale, (n, k), block_size)).to(dtype)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per-tensor or per-token FP8 -> dtype (scale broadcasts against q)."""
    return (q.float() * scale.float()).to(dtype)
