/* Small C loops for the steps torch cannot do in few passes on a CPU: E2M1 rounding + FP4 packing, block
   amaxes (one pass, NaN/Inf flagged), per-row INT8, and the FP8 block cast. dsquant/convert/native.py loads
   them through ctypes (which releases the GIL during each call, so chunk threads run in parallel); the Python
   module below is empty and exists so that setuptools builds and installs this file as an extension.
   IEEE division and comparisons only, compiled without fast-math and without FMA contraction (pyproject.toml),
   so results are bit-identical to dsquant.formats (tests/checkpoint/test_cpuquant.py checks it). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native", NULL, 0, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&native_module); }
