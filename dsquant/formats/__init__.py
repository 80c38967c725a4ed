"""The numbers of each format, implemented once in pure torch: the spec every kernel matches bit for bit."""

from dsquant.formats.fp4 import FP4_E2M1_MAX, pack_fp4, round_to_e2m1, unpack_fp4
from dsquant.formats.fp8 import (
    FP8_BLOCK,
    FP8_E4M3_MAX,
    dequantize_fp8,
    dequantize_fp8_block,
    dequantize_fp8_per_token_group,
    quantize_fp8_block,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
    quantize_fp8_per_token_group,
)
from dsquant.formats.int8 import INT8_MAX, dequantize_int8, quantize_int8_per_channel, quantize_int8_per_token
from dsquant.formats.mxfp4 import MXFP4_BLOCK, dequantize_mxfp4, quantize_mxfp4
from dsquant.formats.nvfp4 import NVFP4_BLOCK, dequantize_nvfp4, quantize_nvfp4

__all__ = [
    "FP4_E2M1_MAX", "FP8_BLOCK", "FP8_E4M3_MAX", "INT8_MAX", "MXFP4_BLOCK", "NVFP4_BLOCK",
    "pack_fp4", "unpack_fp4", "round_to_e2m1",
    "quantize_fp8_per_tensor", "quantize_fp8_per_token", "quantize_fp8_per_token_group", "quantize_fp8_block",
    "dequantize_fp8", "dequantize_fp8_block", "dequantize_fp8_per_token_group",
    "quantize_int8_per_token", "quantize_int8_per_channel", "dequantize_int8",
    "quantize_nvfp4", "dequantize_nvfp4", "quantize_mxfp4", "dequantize_mxfp4",
]
