"""MLA projections the engines can only load in some formats (formats.md section 8.11).

- mla-format: `kv_b_proj`, `q_a_proj` or `kv_a_proj_with_mqa` stored as FP4 (NVFP4/MXFP4). SGLang's
  DeepSeek `post_load_weights` splits kv_b_proj into w_kc/w_vc only for FP8 (block/channel), INT8, AWQ
  or BF16 weights, and TensorRT-LLM's DeepSeek loader fuses q_a/kv_a and splits kv_b only as BF16 or
  FP8-block. (vLLM dequantizes kv_b_proj whatever its format.) NVIDIA's FP4 checkpoints keep MLA
  BF16. Error.
"""

from __future__ import annotations

from dsquant.check.finding import Finding
from dsquant.check.names import module_format
from dsquant.check.view import CheckpointView

MLA_STRICT = ("kv_b_proj", "q_a_proj", "kv_a_proj_with_mqa")
FP4 = ("nvfp4", "mxfp4")


def check(view: CheckpointView) -> list[Finding]:
    bad = []
    for module, params in view.modules.items():
        if ".self_attn." in module and module.rsplit(".", 1)[-1] in MLA_STRICT:
            fmt = module_format(params)
            if fmt in FP4:
                bad.append(f"{module} ({fmt})")
    if not bad:
        return []
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return [Finding("mla-format", "error", f"{len(bad)} MLA projection(s) stored as FP4, which SGLang and "
                    f"TensorRT-LLM cannot load there (keep them BF16 or FP8-block): {', '.join(bad[:3])}{more}",
                    tensor=bad[0].split()[0])]
