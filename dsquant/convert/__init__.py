"""Convert a DeepSeek checkpoint into a quantized one.

pipeline: `convert` (plan -> validate -> per-shard processing -> finalize); plan: the plan from headers alone;
process: quantize and write one shard; config: output configs and the recipe record; quantizers: the weight
quantizers per device (format references, cpuquant on the CPU, Triton on CUDA); v4 / v4_config: DeepSeek-V4's
official layout and its configs.
"""

from dsquant.convert.pipeline import ConvertSummary, convert, parse_size

__all__ = ["ConvertSummary", "convert", "parse_size"]
