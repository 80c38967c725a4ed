"""ctypes wrappers for the C loops in _native.c, the steps torch cannot do in few passes on a CPU: E2M1
rounding + FP4 packing, block amaxes (one pass, NaN/Inf flagged), per-row INT8, and the FP8 block cast.

`e2m1_pack(x, denom, block)` computes, for x [..., K] (float32 or BF16) and one float32 denominator per block of `block`
elements, exactly what dsquant.formats does: y = x / denom (0 where denom == 0), E2M1 code by the format's
thresholds (fp4.py: ties to even), sign from y < 0, two codes per byte with the even element in the low nibble.
`int8_rows` is formats/int8.py: scale = max(amax, 1e-10) / 127, q = clamp(round-half-even(x / scale), +-127),
the rounding done by adding and subtracting 1.5 * 2^23 (exact for |x / scale| <= 127).

_native.c is built at install time as the optional extension dsquant.convert._native (pyproject.toml); this
module loads that file through ctypes, which releases the GIL during each call so chunk threads run in parallel.
When the extension was not built (no C compiler at install), `available()` is False and cpuquant uses its torch
path. DSQUANT_NO_NATIVE=1 forces the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)


@functools.cache
def _load() -> ctypes.CDLL | None:
    if os.environ.get("DSQUANT_NO_NATIVE"):
        return None
    try:
        spec = importlib.util.find_spec("dsquant.convert._native")
        if spec is None or not spec.origin:
            raise OSError("the extension dsquant.convert._native was not built at install")
        lib = ctypes.CDLL(spec.origin)
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        for suffix in ("f32", "bf16"):
            getattr(lib, f"e2m1_pack_{suffix}").argtypes = [ptr, ptr, ptr, i64, i64]
            getattr(lib, f"e2m1_pack_{suffix}").restype = None
            getattr(lib, f"block_amax_{suffix}").argtypes = [ptr, ptr, i64, i64]
            getattr(lib, f"block_amax_{suffix}").restype = ctypes.c_int
            getattr(lib, f"int8_rows_{suffix}").argtypes = [ptr, ptr, ptr, i64, i64]
            getattr(lib, f"int8_rows_{suffix}").restype = ctypes.c_int
            getattr(lib, f"fp8_block_cast_{suffix}").argtypes = [ptr, ptr, ptr, i64, i64, i64]
            getattr(lib, f"fp8_block_cast_{suffix}").restype = None
        return lib
    except (OSError, AttributeError) as e:
        log.info("native C loops unavailable (%s); using the torch path", e)
        return None


def available() -> bool:
    return _load() is not None


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def accepts(x: torch.Tensor) -> bool:
    """Whether the C loops take this tensor as it is (float32 or BF16 on the CPU, with the library built)."""
    return x.dtype in _SUFFIX and x.device.type == "cpu" and available()


def _fn(name: str, x: torch.Tensor):
    assert accepts(x), f"native loops take float32/bfloat16 CPU tensors, got {x.dtype} on {x.device}"
    return getattr(_load(), f"{name}_{_SUFFIX[x.dtype]}")


def e2m1_pack(x: torch.Tensor, denom: torch.Tensor, block: int) -> torch.Tensor:
    """x float32/bf16 [..., K], denom float32 [..., K // block] (one per block) -> packed uint8 [..., K // 2]."""
    x = x.contiguous()
    denom = denom.float().contiguous()
    assert x.shape[-1] % block == 0 and block % 2 == 0 and block <= 64, f"block {block} for {tuple(x.shape)}"
    assert denom.numel() * block == x.numel(), f"{tuple(denom.shape)} denominators for {tuple(x.shape)} values"
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=torch.uint8)
    _fn("e2m1_pack", x)(x.data_ptr(), denom.data_ptr(), out.data_ptr(), denom.numel(), block)
    return out


def block_amax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, bool]:
    """x float32/bf16 [..., K] -> (max |x| per block: float32 [..., K // block], whether NaN/Inf was seen)."""
    x = x.contiguous()
    assert x.shape[-1] % block == 0, f"{tuple(x.shape)} is not a whole number of blocks of {block}"
    out = torch.empty(*x.shape[:-1], x.shape[-1] // block, dtype=torch.float32)
    bad = _fn("block_amax", x)(x.data_ptr(), out.data_ptr(), out.numel(), block)
    return out, bool(bad)


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x float32/bf16 [R, K] -> (q int8 [R, K], scale float32 [R, 1]) as formats.int8, or None on NaN/Inf."""
    x = x.contiguous()
    assert x.dim() == 2, f"per-row INT8 takes a 2-D tensor, got {tuple(x.shape)}"
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32)
    if _fn("int8_rows", x)(x.data_ptr(), scale.data_ptr(), q.data_ptr(), x.shape[0], x.shape[1]):
        return None
    return q, scale


def fp8_block_cast(x: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """x float32/bf16 [N, K] (multiples of block), scale float32 [N / block, K / block] -> float8_e4m3fn [N, K]."""
    x = x.contiguous()
    scale = scale.float().contiguous()
    n, k = x.shape
    assert n % block == 0 and k % block == 0 and tuple(scale.shape) == (n // block, k // block), (x.shape, scale.shape)
    q = torch.empty((n, k), dtype=torch.uint8)
    _fn("fp8_block_cast", x)(x.data_ptr(), scale.data_ptr(), q.data_ptr(), n, k, block)
    return q.view(torch.float8_e4m3fn)
