"""DeepSeek-V4 checkpoints for the --check rules: the synthetic official layouts (dsquant.checkpoint.synth_v4, whose
every variant transformers 5.25 loads to the stored values: tests/checkpoint/test_synth_v4.py) as a `Ckpt` that a
test breaks in one place before writing it."""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from dsquant.checkpoint.synth_v4 import v4_config, v4_tensors
from dsquant.formats import quantize_nvfp4
from tests.check.ckpt_factory import Ckpt

# hf_quant_config.json exclude_modules of NVIDIA's V4 NVFP4 releases (deepseek-v4.md 3.3)
NVIDIA_EXCLUDE = ["*.attn.*", "*.attn_norm.*", "*.ffn.shared_experts.*", "*.ffn.gate.*", "*.ffn_norm.*",
                  "embed.weight", "head.weight", "*.hc_*", "*.h_proj.*", "*.e_proj.*", "*.enorm.*", "*.hnorm.*",
                  "mtp.*.norm.*", "norm.weight"]


@lru_cache(maxsize=None)
def _tensors(variant: str) -> dict[str, torch.Tensor]:
    return v4_tensors(v4_config(variant))


def build_v4(variant: str = "flash") -> Ckpt:
    """A fresh Ckpt of the variant: its own dicts (tests replace tensors, never change them in place)."""
    return Ckpt(dict(_tensors(variant)), json.loads(json.dumps(v4_config(variant))))


def expert_modules(ck: Ckpt, prefix: str = "layers.") -> list[str]:
    return sorted(n[: -len(".weight")] for n in ck.tensors if n.startswith(prefix) and ".ffn.experts." in n
                  and n.endswith(".weight"))


def to_nvfp4_experts(ck: Ckpt, prefix: str = "layers.") -> None:
    """NVIDIA's hybrid layout (deepseek-v4.md 3.3): routed experts under `prefix` become ModelOpt NVFP4 (U8 weight,
    E4M3 weight_scale per 16, F32 weight_scale_2 and input_scale), everything else stays as the source has it."""
    from dsquant.formats.ondisk import read_quantized

    for m in expert_modules(ck, prefix):
        w = read_quantized(m, ck.tensors, ck.config["quantization_config"]).dequantize(torch.float32)
        del ck.tensors[m + ".scale"]
        q, bs, g = quantize_nvfp4(w)
        ck.tensors.update({m + ".weight": q, m + ".weight_scale": bs, m + ".weight_scale_2": g,
                           m + ".input_scale": torch.tensor(1.0)})
    ck.config["quantization_config"]["moe_quant_algo"] = "NVFP4"
    layers = {m: {"quant_algo": "NVFP4", "group_size": 16} for m in expert_modules(ck, prefix)}
    ck.hf_quant_config = {"producer": {"name": "modelopt", "version": "dsv4-nvfp4-experts"},
                          "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                                           "group_size": 16, "quantized_layers": layers,
                                           "exclude_modules": NVIDIA_EXCLUDE}}
