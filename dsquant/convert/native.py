"""Small C loops for the steps torch cannot do in few passes on a CPU: E2M1 rounding + FP4 packing, block
amaxes (one pass, NaN/Inf flagged), per-row INT8, and the FP8 block cast.

`e2m1_pack(x, denom, block)` computes, for x [..., K] (float32 or BF16) and one float32 denominator per block of `block`
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

/* Inputs come as float32 or as BF16 bit patterns (uint16); BF16 -> float32 is exact (a 16-bit shift). */
static inline float f32_at(const float *p, int64_t i) { return p[i]; }
static inline float bf16_at(const uint16_t *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16; float f; memcpy(&f, &u, 4); return f;
}
/* |x| as int32 bits: for non-negative floats integer order is float order, and NaN/Inf sort above every finite
   value, so one integer max (which vectorizes, unlike a float max under IEEE rules) gives amax and the check. */
static inline int32_t f32_abits(const float *p, int64_t i) {
    int32_t u; memcpy(&u, p + i, 4); return u & 0x7FFFFFFF;
}
static inline int32_t bf16_abits(const uint16_t *p, int64_t i) { return (int32_t)(p[i] & 0x7FFF) << 16; }
static inline float bits_f32(int32_t u) { float f; memcpy(&f, &u, 4); return f; }
#define FINITE_MAX 0x7F7FFFFF

/* float32 (finite: callers check NaN/Inf first) -> float8_e4m3fn byte with formats/fp8.py's clamp to +-448,
   rounded to nearest even like torch's cast: normals round the mantissa to 3 bits on the bit pattern; below
   2^-6 the value is a multiple of 2^-9, rounded by adding and subtracting 1.5 * 2^23 (exact, and 8 * 2^-9 =
   2^-6 encodes as 0x08, the smallest normal). Clamp and selects are done with integer masks on |v|'s bits
   (for non-negative floats integer order is float order): no branch, so the loops around it vectorize. */
static inline uint8_t e4m3(float v) {
    uint32_t u; memcpy(&u, &v, 4);
    const uint32_t sign = (u >> 24) & 0x80u;
    int32_t m = (int32_t)(u & 0x7FFFFFFFu);
    m -= (m - 0x43E00000) & -(int32_t)(m > 0x43E00000); /* |v| > 448 -> 448 */
    const uint32_t rn = (uint32_t)m + 0x7FFFFu + (((uint32_t)m >> 20) & 1u);
    const uint32_t normal = (rn >> 20) - (120u << 3);
    float a; memcpy(&a, &m, 4);
    const uint32_t sub = (uint32_t)(int32_t)((a * 512.0f + 12582912.0f) - 12582912.0f);
    const uint32_t is_normal = (uint32_t)-(int32_t)(m >= 0x3C800000);
    return (uint8_t)(sign | (normal & is_normal) | (sub & ~is_normal));
}

#define DEFINE_KERNELS(SUF, T, AT, ABITS)                                                                          \
/* max |x| per block of `block` values; returns 1 if any value is NaN or Inf. */                                 \
int block_amax_##SUF(const T *x, float *out, int64_t n_blocks, int64_t block) {                                \
    int32_t all = 0;                                                                                            \
    for (int64_t b = 0; b < n_blocks; ++b) {                                                                     \
        int32_t m = 0;                                                                                          \
        for (int64_t i = 0; i < block; ++i) { int32_t a = ABITS(x, b * block + i); m = a > m ? a : m; }         \
        out[b] = bits_f32(m);                                                                                   \
        all = m > all ? m : all;                                                                                \
    }                                                                                                           \
    return all > FINITE_MAX;                                                                                    \
}                                                                                                               \
/* Per-row symmetric INT8 as formats/int8.py: scale = max(amax, 1e-10) / 127, q = clamp(rne(x / scale), +-127); \
   |x / scale| <= 127 (plus rounding), so adding and subtracting 1.5 * 2^23 rounds half to even exactly.          \
   Returns 1 if a value is NaN or Inf. */                                                                       \
int int8_rows_##SUF(const T *x, float *scale, int8_t *q, int64_t rows, int64_t k) {                            \
    for (int64_t r = 0; r < rows; ++r) {                                                                         \
        int32_t mb = 0;                                                                                         \
        for (int64_t i = 0; i < k; ++i) { int32_t a = ABITS(x, r * k + i); mb = a > mb ? a : mb; }             \
        if (mb > FINITE_MAX) return 1;                                                                          \
        const float m = bits_f32(mb);                                                                           \
        const float s = (m > 1e-10f ? m : 1e-10f) / 127.0f;                                                     \
        scale[r] = s;                                                                                           \
        for (int64_t i = 0; i < k; ++i) {                                                                        \
            float v = (AT(x, r * k + i) / s + 12582912.0f) - 12582912.0f;                                       \
            v = v > 127.0f ? 127.0f : v;                                                                        \
            v = v < -127.0f ? -127.0f : v;                                                                      \
            q[r * k + i] = (int8_t)(int32_t)v;                                                                  \
        }                                                                                                       \
    }                                                                                                           \
    return 0;                                                                                                   \
}                                                                                                               \
/* FP8 128x128 blocks as formats/fp8.py: q = e4m3(clamp(x / scale[r / block][c / block], +-448)); rows, k are    \
   multiples of block; scale is [rows / block, k / block]. */                                                   \
void fp8_block_cast_##SUF(const T *restrict x, const float *scale, uint8_t *restrict q, int64_t rows, int64_t k,  \
                         int64_t block) {                                                                       \
    const int64_t kb = k / block;                                                                               \
    for (int64_t r = 0; r < rows; ++r) {                                                                         \
        const float *sr = scale + (r / block) * kb;                                                             \
        for (int64_t b = 0; b < kb; ++b) { /* one divisor per inner loop: it vectorizes */                       \
            const float s = sr[b];                                                                              \
            const int64_t o = r * k + b * block;                                                                \
            for (int64_t i = 0; i < block; ++i) q[o + i] = e4m3(AT(x, o + i) / s);                               \
        }                                                                                                       \
    }                                                                                                           \
}                                                                                                               \
/* y = x / denom per block (0 where denom <= 0), E2M1 code by fp4.py's thresholds, sign from y < 0, two codes   \
   per byte (even element low). out: n_blocks * block / 2 bytes; block <= 64 and even. */                       \
void e2m1_pack_##SUF(const T *x, const float *denom, uint8_t *out, int64_t n_blocks, int64_t block) {          \
    uint8_t codes[64];                                                                                          \
    for (int64_t b = 0; b < n_blocks; ++b) {                                                                     \
        const float d = denom[b];                                                                               \
        if (d > 0.0f) {                                                                                         \
            for (int64_t i = 0; i < block; ++i) {                                                                \
                const float y = AT(x, b * block + i) / d;                                                       \
                const float a = y < 0.0f ? -y : y;                                                              \
                const int m = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f)              \
                              + (a >= 3.5f) + (a > 5.0f);                                                       \
                codes[i] = (uint8_t)(m | ((y < 0.0f) << 3));                                                    \
            }                                                                                                   \
        } else {                                                                                                \
            memset(codes, 0, (size_t)block);                                                                    \
        }                                                                                                       \
        uint8_t *ob = out + b * (block / 2);                                                                    \
        for (int64_t i = 0; i < block / 2; ++i) ob[i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));      \
    }                                                                                                           \
}

DEFINE_KERNELS(f32, float, f32_at, f32_abits)
DEFINE_KERNELS(bf16, uint16_t, bf16_at, bf16_abits)
"""

# -ffp-contract=off and no -ffast-math: every operation rounds exactly as in the reference. -fno-trapping-math
# only lets the compiler evaluate both sides of a select (no FP exception is observed here), which is what
# vectorizes the branch-free FP8 cast (with its integer-mask selects: quantize_fp8_block went from 328 to
# 1092 MB/s of BF16 per core on the 2-core host); results unchanged (tests/checkpoint/test_cpuquant.py).
_FLAGS = ["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-ffp-contract=off",
          "-fno-fast-math"]
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
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:
            log.info("native E2M1 loop unavailable (%s); using the torch path", e)
        return _lib


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
