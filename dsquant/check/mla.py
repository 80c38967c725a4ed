"""MLA projections the engines can only load in some formats (formats.md section 8.11).

- mla-format: `kv_b_proj`, `q_a_proj` or `kv_a_proj_with_mqa` stored as FP4 (NVFP4/MXFP4), as
  llm-compressor's default NVFP4 scheme (every Linear but lm_head) writes them. vLLM loads them: it
  dequantizes kv_b_proj through the layer's own quant method whatever the format, and builds
  q_a_proj + kv_a_proj_with_mqa as one merged linear with per-partition scales
  (vllm/model_executor/models/deepseek_v2.py). SGLang does not
  (python/sglang/srt/models/deepseek_common/deepseek_weight_loader.py): `post_load_weights` reads
  `kv_b_proj.weight` and splits it into w_kc/w_vc, converting only FP8 (block/channel), INT8 and AWQ weights,
  so packed FP4 bytes (ModelOpt) are used as values and a missing `weight` (compressed-tensors
  `weight_packed`) fails; and `do_load_weights` concatenates each q_a_proj tensor with its kv_a_proj_with_mqa
  partner into `fused_qkv_a_proj_with_mqa`, where a pair of 0-d ModelOpt global scales keeps q_a_proj's value
  for both (kv_a_proj_with_mqa then dequantizes with the wrong scale) and [1] divisors become a [2] tensor
  for a one-partition parameter. TensorRT-LLM's DeepSeek loader fuses q_a/kv_a and splits kv_b only as BF16
  or FP8-block. NVIDIA's FP4 checkpoints keep MLA BF16. Error: SGLang fails or computes wrong.
"""

from __future__ import annotations

from dsquant.check.finding import Finding
from dsquant.check.names import fp4_group, module_format
from dsquant.checkpoint.reader import Checkpoint

MLA_STRICT = ("kv_b_proj", "q_a_proj", "kv_a_proj_with_mqa")


def check(view: Checkpoint) -> list[Finding]:
    bad = []
    for module, params in view.modules.items():
        if ".self_attn." in module and module.rsplit(".", 1)[-1] in MLA_STRICT:
            fmt = module_format(params)
            if fp4_group(fmt) is not None:
                bad.append(f"{module} ({fmt})")
    if not bad:
        return []
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return [Finding("mla-format", "error", f"{len(bad)} MLA projection(s) stored as FP4: vLLM loads them, but "
                    "SGLang's DeepSeek loader (post_load_weights, fused q_a/kv_a) and TensorRT-LLM cannot (keep "
                    f"them BF16 or FP8-block for those engines): {', '.join(bad[:3])}{more}",
                    tensor=bad[0].split()[0])]
