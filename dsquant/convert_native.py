"""Small C loops for the steps torch cannot do in few passes on a CPU: E2M1 rounding + FP4 packing, block
amaxes (one pass, NaN/Inf flagged), and per-row INT8.

`e2m1_pack(x, denom, block)` computes, for float32 x [..., K] and one float32 denominator per block of `block`
elements, exactly what dsquant.formats does: y = x / denom (0 where denom == 0), E2M1 code by the format's
thresholds (fp4.py: ties to even), sign from y < 0, two codes per byte with the even element in the low nibble.
`int8_rows` is formats/int8.py: scale = max(amax, 1e-10) / 127, q = clamp(round-half-even(x / scale), +-127),
the rounding done by adding and subtracting 1.5 * 2^23 (exact for |x / scale| <= 127).
IEEE division and comparisons only, compiled without fast-math and without FMA contraction, so results are
bit-identical to the torch reference (tests/checkpoint/test_cpuquant.py checks it).

The library is compiled on first use with the system C compiler into the dsquant cache (a few hundred ms) and
loaded through ctypes, which releases the GIL during the call so chunk threads run in parallel. Without a C
compiler `available()` is False and callers use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* max |x| over each block of `block` values; returns 1 if any value is NaN or Inf (a plain max would hide NaN). */
int block_amax(const float *x, float *out, int64_t n_blocks, int64_t block) {
    int bad = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
        const float *xb = x + b * block;
        float m = 0.0f;
        for (int64_t i = 0; i < block; ++i) {
            float a = fabsf(xb[i]);
            bad |= !(a <= 3.4028234663852886e38f);
            m = a > m ? a : m;
        }
        out[b] = m;
    }
    return bad;
}

/* Per-row symmetric INT8 as formats/int8.py: scale = max(amax, 1e-10) / 127, q = clamp(rne(x / scale), +-127).
   |x / scale| <= 127 (plus rounding), so adding and subtracting 1.5 * 2^23 rounds half to even exactly.
   Returns 1 if a value is NaN or Inf. */
int int8_rows(const float *x, float *scale, int8_t *q, int64_t rows, int64_t k) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * k;
        float m = 0.0f;
        int bad = 0;
        for (int64_t i = 0; i < k; ++i) {
            float a = fabsf(xr[i]);
            bad |= !(a <= 3.4028234663852886e38f);
            m = a > m ? a : m;
        }
        if (bad) return 1;
        const float s = (m > 1e-10f ? m : 1e-10f) / 127.0f;
        scale[r] = s;
        int8_t *qr = q + r * k;
        for (int64_t i = 0; i < k; ++i) {
            float v = (xr[i] / s + 12582912.0f) - 12582912.0f;
            v = v > 127.0f ? 127.0f : v;
            v = v < -127.0f ? -127.0f : v;
            qr[i] = (int8_t)(int32_t)v;
        }
    }
    return 0;
}

/* y = x / denom per block (0 where denom <= 0), E2M1 code by fp4.py's thresholds, sign from y < 0, two codes
   per byte (even element low). x: n_blocks * block float32; out: n_blocks * block / 2 bytes; block <= 64, even. */
void e2m1_pack(const float *x, const float *denom, uint8_t *out, int64_t n_blocks, int64_t block) {
    uint8_t codes[64];
    for (int64_t b = 0; b < n_blocks; ++b) {
        const float d = denom[b];
        const float *xb = x + b * block;
        if (d > 0.0f) {
            for (int64_t i = 0; i < block; ++i) {
                const float y = xb[i] / d;
                const float a = fabsf(y);
                const int m = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f)
                              + (a > 5.0f);
                codes[i] = (uint8_t)(m | ((y < 0.0f) << 3));
            }
        } else {
            memset(codes, 0, (size_t)block);
        }
        uint8_t *ob = out + b * (block / 2);
        for (int64_t i = 0; i < block / 2; ++i) ob[i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
    }
}
"""

# -ffp-contract=off and no -ffast-math: every operation rounds exactly as in the reference.
_FLAGS = ["-O3", "-std=c99", "-fno-math-errno", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("DSQUANT_CACHE") or Path.home() / ".cache" / "dsquant") / "native"


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("DSQUANT_NO_NATIVE"):
            return None
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        tag = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
        so = _cache_dir() / f"e2m1_{tag}.so"
        try:
            if not so.is_file():
                if cc is None:
                    raise OSError("no C compiler (cc/gcc) on PATH")
                so.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                    src, out = Path(tmp) / "e2m1.c", Path(tmp) / "e2m1.so"
                    src.write_text(_SOURCE)
                    subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True,
                                   timeout=120)
                    os.replace(out, so)
            lib = ctypes.CDLL(str(so))
            lib.e2m1_pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64]
            lib.e2m1_pack.restype = None
            lib.block_amax.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
            lib.block_amax.restype = ctypes.c_int
            lib.int8_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64]
            lib.int8_rows.restype = ctypes.c_int
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:
            log.info("native E2M1 loop unavailable (%s); using the torch path", e)
        return _lib


def available() -> bool:
    return _load() is not None


def e2m1_pack(x: torch.Tensor, denom: torch.Tensor, block: int) -> torch.Tensor:
    """x float32 [..., K] (contiguous, CPU), denom float32 [..., K // block] -> packed uint8 [..., K // 2]."""
    lib = _load()
    assert lib is not None, "native E2M1 loop not available"
    x = x.contiguous()
    denom = denom.float().contiguous()
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % block == 0
    assert block % 2 == 0 and block <= 64, f"block {block}: the C loop packs blocks of up to 64 values"
    assert denom.numel() * block == x.numel(), f"{tuple(denom.shape)} denominators for {tuple(x.shape)} values"
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=torch.uint8)
    lib.e2m1_pack(x.data_ptr(), denom.data_ptr(), out.data_ptr(), denom.numel(), block)
    return out


def block_amax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, bool]:
    """x float32 [..., K] -> (max |x| per block of `block`: float32 [..., K // block], whether NaN/Inf was seen)."""
    lib = _load()
    x = x.contiguous()
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % block == 0
    out = torch.empty(*x.shape[:-1], x.shape[-1] // block, dtype=torch.float32)
    bad = lib.block_amax(x.data_ptr(), out.data_ptr(), out.numel(), block)
    return out, bool(bad)


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x float32 [R, K] -> (q int8 [R, K], scale float32 [R, 1]) as formats.int8, or None if x holds NaN/Inf."""
    lib = _load()
    x = x.contiguous()
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32)
    if lib.int8_rows(x.data_ptr(), scale.data_ptr(), q.data_ptr(), x.shape[0], x.shape[1]):
        return None
    return q, scale
