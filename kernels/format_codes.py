"""Integer codes of the formats the kernels handle: the format constexpr (W_FMT, FMT, KV_FMT) of every family.

One code per format, so a code means the same format in the GEMM, MoE and MLA kernels. The codes are plain
ints, passed as constexpr arguments; jit code compares against them as `format_codes.NVFP4` (Triton's
compiler reads a module's int attribute as a constant, where it refuses a bare global int).
"""

BF16 = 0
FP8_BLOCK = 1  # E4M3, float32 scales per 128x128 weight block and per 1x128 activation group (DeepSeek)
INT8 = 2  # per-output-channel weights, per-token activations, int32 accumulation
NVFP4 = 3  # E2M1, an E4M3 scale per 16 along K, a float32 global scale
MXFP4 = 4  # E2M1, an E8M0 scale per 32 along K
MXFP4_W4A8 = 5  # MXFP4 weights on FP8 tensor cores, activations quantized per 1x128 group
FP8_TENSOR = 6  # E4M3 with one float32 per-tensor scale (the "fp8" KV cache)
FP8_DS = 7  # E4M3 with a float32 scale per 128 values and a bf16 rope part (the "fp8_ds" KV cache)

# The families' format names -> code.
MOE_FORMATS = {"bf16": BF16, "fp8": FP8_BLOCK, "int8": INT8, "nvfp4": NVFP4, "mxfp4": MXFP4}
KV_CACHE_FORMATS = {"bf16": BF16, "fp8": FP8_TENSOR, "fp8_ds": FP8_DS}
