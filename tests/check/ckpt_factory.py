"""Small hand-made DeepSeek-V3 checkpoints in each on-disk convention, built with dsquant.formats.

Independent of dsquant's converter on purpose: the --check rules must hold on checkpoints any tool
writes, so the fixtures follow formats.md directly (names, dtypes, shapes, config keys). Tests take
a `Ckpt`, break one thing in its dicts, and write it.

Tiny model: hidden 64, 2 decoder layers (layer 0 dense, layer 1 MoE with 4 experts + 1 shared),
MLA with q_lora_rank 32, kv_lora_rank 32, rope 16, and the MTP layer 2. Every K is a multiple of 32
so NVFP4 and MXFP4 both apply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsquant.formats import quantize_fp8_block, quantize_int8_per_channel, quantize_mxfp4, quantize_nvfp4
from dsquant.formats.nvfp4 import nvfp4_global_scale

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "vocab_size": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
TOKENIZER = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}
MTP = 2  # layer id of the MTP layer (= num_hidden_layers)
NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
              "dynamic": False}
MXFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
              "dynamic": False, "scale_dtype": "uint8"}


def _w(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)


def bf16_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """All tensors of the tiny model in BF16 (router bias float32), HF naming."""
    c, g = CONFIG, torch.Generator().manual_seed(seed)
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    t = {"model.embed_tokens.weight": _w(g, c["vocab_size"], h), "lm_head.weight": _w(g, c["vocab_size"], h),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(c["num_hidden_layers"] + 1):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "self_attn.q_a_proj.weight"] = _w(g, c["q_lora_rank"], h)
        t[p + "self_attn.q_a_layernorm.weight"] = torch.ones(c["q_lora_rank"], dtype=torch.bfloat16)
        t[p + "self_attn.q_b_proj.weight"] = _w(g, heads * qk, c["q_lora_rank"])
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = _w(g, c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
        t[p + "self_attn.kv_a_layernorm.weight"] = torch.ones(c["kv_lora_rank"], dtype=torch.bfloat16)
        kv_b_rows = heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
        t[p + "self_attn.kv_b_proj.weight"] = _w(g, kv_b_rows, c["kv_lora_rank"])
        t[p + "self_attn.o_proj.weight"] = _w(g, h, heads * c["v_head_dim"])
        if layer < c["first_k_dense_replace"]:
            mlps = [(p + "mlp.", c["intermediate_size"])]
        else:
            mlps = [(p + f"mlp.experts.{e}.", c["moe_intermediate_size"]) for e in range(c["n_routed_experts"])]
            mlps.append((p + "mlp.shared_experts.", c["moe_intermediate_size"] * c["n_shared_experts"]))
            t[p + "mlp.gate.weight"] = _w(g, c["n_routed_experts"], h)
            t[p + "mlp.gate.e_score_correction_bias"] = torch.randn(c["n_routed_experts"], generator=g) * 0.1
        for mp, inter in mlps:
            t[mp + "gate_proj.weight"] = _w(g, inter, h)
            t[mp + "up_proj.weight"] = _w(g, inter, h)
            t[mp + "down_proj.weight"] = _w(g, h, inter)
    m = f"model.layers.{MTP}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
        t[m + name + ".weight"] = torch.ones(h, dtype=torch.bfloat16)
    t[m + "eh_proj.weight"] = _w(g, h, 2 * h)
    t[m + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
    t[m + "shared_head.head.weight"] = t["lm_head.weight"].clone()
    return t


def is_mlp(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")


def is_linear(module: str) -> bool:
    return is_mlp(module) or module.rsplit(".", 1)[-1] in (
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@dataclass
class Ckpt:
    tensors: dict[str, torch.Tensor]
    config: dict
    hf_quant_config: dict | None = None
    extra_files: dict[str, str] = field(default_factory=lambda: {"tokenizer_config.json": json.dumps(TOKENIZER)})

    def write(self, path: Path, num_shards: int = 2, index: bool = True) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        names = sorted(self.tensors)
        per = math.ceil(len(names) / num_shards)
        weight_map, total = {}, 0
        for s in range(num_shards):
            chunk = names[s * per:(s + 1) * per]
            file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors" if index else "model.safetensors"
            save_file({n: self.tensors[n].clone() for n in chunk}, str(path / file))
            for n in chunk:
                weight_map[n] = file
                total += self.tensors[n].numel() * self.tensors[n].element_size()
        if index:
            (path / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (path / "config.json").write_text(json.dumps(self.config, indent=1))
        if self.hf_quant_config is not None:
            (path / "hf_quant_config.json").write_text(json.dumps(self.hf_quant_config, indent=1))
        for name, text in self.extra_files.items():
            (path / name).write_text(text)
        return path


def _modules(tensors, pred):
    return sorted({n[: -len(".weight")] for n in tensors if n.endswith(".weight") and pred(n[: -len(".weight")])})


def _nvfp4_pairs(t: dict, modules: list[str]) -> dict[str, torch.Tensor]:
    """module -> shared global scale: gate/up partners get the larger of their two (one scale per pair)."""
    gs = {m: nvfp4_global_scale(t[m + ".weight"].float().abs().amax()) for m in modules}
    for m in modules:
        if m.endswith("gate_proj") and m.replace("gate_proj", "up_proj") in gs:
            up = m.replace("gate_proj", "up_proj")
            gs[m] = gs[up] = torch.maximum(gs[m], gs[up])
    return gs


def build(kind: str = "modelopt", seed: int = 0) -> Ckpt:
    """kind: bf16 | deepseek-fp8 | modelopt | ct-nvfp4 | ct-mxfp4 | ct-int8."""
    t, cfg = bf16_tensors(seed), json.loads(json.dumps(CONFIG))
    if kind == "bf16":
        return Ckpt(t, cfg)
    if kind == "deepseek-fp8":
        for m in _modules(t, is_linear):
            q, s = quantize_fp8_block(t[m + ".weight"])
            t[m + ".weight"], t[m + ".weight_scale_inv"] = q, s
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]}
        return Ckpt(t, cfg)
    # FP4/INT8 recipes quantize the decoder MLPs; attention, router, lm_head and the MTP layer stay BF16.
    mlps = _modules(t, lambda m: is_mlp(m) and not m.startswith(f"model.layers.{MTP}."))
    if kind in ("modelopt", "ct-nvfp4"):
        gs = _nvfp4_pairs(t, mlps)
        for m in mlps:
            q, bs, g = quantize_nvfp4(t.pop(m + ".weight"), gs[m])
            act = torch.tensor(0.01, dtype=torch.float32)
            if kind == "modelopt":
                t.update({m + ".weight": q, m + ".weight_scale": bs, m + ".weight_scale_2": g, m + ".input_scale": act})
            else:
                t.update({m + ".weight_packed": q, m + ".weight_scale": bs,
                          m + ".weight_global_scale": (1 / g).reshape(1),
                          m + ".input_global_scale": (1 / act).reshape(1)})
    elif kind == "ct-mxfp4":
        for m in mlps:
            q, s = quantize_mxfp4(t.pop(m + ".weight"))
            t.update({m + ".weight_packed": q, m + ".weight_scale": s})
    elif kind == "ct-int8":
        for m in mlps:
            q, s = quantize_int8_per_channel(t[m + ".weight"])
            t.update({m + ".weight": q, m + ".weight_scale": s})
    else:
        raise ValueError(f"unknown fixture kind {kind!r}")
    if kind == "modelopt":
        exclude = ["lm_head", "model.layers.0.self_attn*", "model.layers.1.self_attn*", f"model.layers.{MTP}*"]
        cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": exclude,
                                      "producer": {"name": "modelopt", "version": "0.0"},
                                      "config_groups": {"group_0": {"weights": NVFP4_ARGS,
                                                                    "input_activations": NVFP4_ARGS,
                                                                    "targets": ["Linear"]}},
                                      "kv_cache_scheme": {"num_bits": 8, "type": "float", "dynamic": False}}
        hq = {"producer": {"name": "modelopt", "version": "0.0"},
              "quantization": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8",
                               "exclude_modules": exclude}}
        return Ckpt(t, cfg, hq)
    weights = {"ct-nvfp4": NVFP4_ARGS, "ct-mxfp4": MXFP4_ARGS,
               "ct-int8": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}}
    inputs = {"ct-nvfp4": {**NVFP4_ARGS, "dynamic": "local"}}  # W4A4: static global, local per-16 scales
    fmt = {"ct-nvfp4": "nvfp4-pack-quantized", "ct-mxfp4": "mxfp4-pack-quantized", "ct-int8": "int-quantized"}[kind]
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"weights": weights[kind], "input_activations": inputs.get(kind),
                                      "targets": ["Linear"]}},
        "ignore": ["lm_head", r"re:.*self_attn\..*", r"re:.*mlp\.gate$", rf"re:^model\.layers\.{MTP}\..*"],
    }
    return Ckpt(t, cfg)
