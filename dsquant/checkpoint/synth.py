"""Tiny synthetic DeepSeek checkpoints with the exact Hugging Face names, dtypes and shape rules.

`make_synthetic_checkpoint(path, variant=..., source=...)` writes a multi-shard checkpoint that
looks like the published ones (formats.md section 1) at a small size: dense first layer(s), MoE
layers with per-expert tensors and shared experts, the router (`mlp.gate.weight` BF16 and
`e_score_correction_bias` FP32), norms, embeddings, lm_head, one MTP layer (index
num_hidden_layers, with enorm/hnorm/eh_proj/shared_head), config.json in DeepSeek's own keys, and
for FP8 sources `weight_scale_inv` (with `scale_fmt: ue8m0` for "fp8-ue8m0"). Dims are block
shaped: multiples of 128 where DeepSeek's are, and kv_a_proj_with_mqa is kv_lora_rank + 64 rows
(192 here, ragged like DeepSeek's 576). Partner tensors are split across shards on purpose
(gate/up of one expert, q_a/kv_a of one layer, one FP8 weight and its scale).

Variants: "v3" (DeepSeek-V3/R1), "v3.2" (adds the sparse-attention indexer), "v2-lite" (no
q_lora_rank: q_proj; softmax greedy router without bias; DeepseekV2ForCausalLM; no MTP),
"kimi-k2" (1.5x the experts per layer of V3, as 384 vs 256, fewer heads, one expert group).
Weights are seeded random numbers, so the output is the same for the same arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsquant.formats.fp8 import quantize_fp8_block

VARIANTS = ("v3", "v3.2", "v2-lite", "kimi-k2")
SOURCES = ("bf16", "fp8", "fp8-ue8m0")

_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "kv_lora_rank": 128,
    "max_position_embeddings": 4096,
    "moe_intermediate_size": 128,
    "moe_layer_freq": 1,
    "n_group": 2,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 2,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 256,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 1024, "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 1024,
}


def variant_config(variant: str) -> dict:
    """The config.json dict (DeepSeek key names) of a synthetic variant, without quantization_config."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; choose one of {VARIANTS}")
    cfg = json.loads(json.dumps(_V3))
    if variant == "v3.2":
        cfg.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
                   index_head_dim=128, index_n_heads=2, index_topk=64)
        cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV32Config"}
    elif variant == "v2-lite":
        cfg.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", q_lora_rank=None,
                   n_shared_experts=2, scoring_func="softmax", topk_method="greedy", n_group=1,
                   routed_scaling_factor=1.0, norm_topk_prob=False)
        cfg.pop("num_nextn_predict_layers")
        cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                           "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    elif variant == "kimi-k2":
        cfg.update(model_type="kimi_k2", n_routed_experts=12, n_group=1, topk_group=1, num_attention_heads=1,
                   num_key_value_heads=1, routed_scaling_factor=2.827)
    return cfg


def _attention(p: str, c: dict) -> list[tuple[str, tuple, str]]:
    heads, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    h, kv = c["hidden_size"], c["kv_lora_rank"]
    out = []
    if c.get("q_lora_rank"):
        q = c["q_lora_rank"]
        out += [(f"{p}.q_a_proj.weight", (q, h), "linear"), (f"{p}.q_a_layernorm.weight", (q,), "norm"),
                (f"{p}.q_b_proj.weight", (heads * (nope + rope), q), "linear")]
    else:
        out += [(f"{p}.q_proj.weight", (heads * (nope + rope), h), "linear")]
    out += [(f"{p}.kv_a_proj_with_mqa.weight", (kv + rope, h), "linear"),
            (f"{p}.kv_a_layernorm.weight", (kv,), "norm"),
            (f"{p}.kv_b_proj.weight", (heads * (nope + v), kv), "linear"),
            (f"{p}.o_proj.weight", (h, heads * v), "linear")]
    if "index_n_heads" in c:
        ih, idim = c["index_n_heads"], c["index_head_dim"]
        out += [(f"{p}.indexer.wq_b.weight", (ih * idim, c["q_lora_rank"]), "linear"),
                (f"{p}.indexer.wk.weight", (idim, h), "linear"),
                (f"{p}.indexer.k_norm.weight", (idim,), "norm"),
                (f"{p}.indexer.k_norm.bias", (idim,), "norm_bias"),
                (f"{p}.indexer.weights_proj.weight", (ih, h), "dense_bf16")]
    return out


def _mlp(p: str, inter: int, h: int) -> list[tuple[str, tuple, str]]:
    return [(f"{p}.gate_proj.weight", (inter, h), "linear"), (f"{p}.up_proj.weight", (inter, h), "linear"),
            (f"{p}.down_proj.weight", (h, inter), "linear")]


def tensor_specs(c: dict) -> list[tuple[str, tuple, str]]:
    """(name, shape, kind) of every tensor in checkpoint order; kind decides dtype and FP8 treatment."""
    h, vocab = c["hidden_size"], c["vocab_size"]
    specs = [("model.embed_tokens.weight", (vocab, h), "embed")]
    n_mtp = int(c.get("num_nextn_predict_layers", 0) or 0)
    for layer in range(c["num_hidden_layers"] + n_mtp):
        p = f"model.layers.{layer}"
        if layer >= c["num_hidden_layers"]:
            specs += [(f"{p}.embed_tokens.weight", (vocab, h), "embed"), (f"{p}.enorm.weight", (h,), "norm"),
                      (f"{p}.hnorm.weight", (h,), "norm"), (f"{p}.eh_proj.weight", (h, 2 * h), "dense_bf16"),
                      (f"{p}.shared_head.norm.weight", (h,), "norm"),
                      (f"{p}.shared_head.head.weight", (vocab, h), "embed")]
        specs += [(f"{p}.input_layernorm.weight", (h,), "norm")] + _attention(f"{p}.self_attn", c)
        specs += [(f"{p}.post_attention_layernorm.weight", (h,), "norm")]
        if layer < c["first_k_dense_replace"]:
            specs += _mlp(f"{p}.mlp", c["intermediate_size"], h)
            continue
        e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
        specs += [(f"{p}.mlp.gate.weight", (e, h), "router")]
        if c.get("topk_method") == "noaux_tc":
            specs += [(f"{p}.mlp.gate.e_score_correction_bias", (e,), "router_bias")]
        for i in range(e):
            specs += _mlp(f"{p}.mlp.experts.{i}", inter, h)
        specs += _mlp(f"{p}.mlp.shared_experts", inter * c["n_shared_experts"], h)
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (vocab, h), "embed")]
    return specs


def _make_tensor(shape: tuple, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind in ("norm", "norm_bias"):
        base = 1.0 if kind == "norm" else 0.0
        return (base + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    if kind == "router_bias":
        return 0.01 * torch.randn(shape, generator=gen)  # float32, as DeepSeek's Gate.bias
    # Row-varying magnitudes so that per-row and per-block scales differ from each other.
    rows = torch.exp(0.5 * torch.randn((shape[0], 1), generator=gen))
    return (0.02 * rows * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def _tokenizer_json() -> dict:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + 2 specials), loadable by `tokenizers`."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({chars[b]: b + len(specials) for b in range(256)})
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, s in enumerate(specials)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


# V3 partners read together: gate/up of one expert, q_a/kv_a of one layer, an FP8 weight and its scale.
V3_PARTNERS = ((".mlp.experts.0.up_proj.weight", ".mlp.experts.0.gate_proj.weight"),
               ("self_attn.kv_a_proj_with_mqa.weight", "self_attn.q_a_proj.weight"),
               ("mlp.down_proj.weight_scale_inv", "mlp.down_proj.weight"))


def assign_shards(tensors: dict[str, torch.Tensor], num_shards: int, partners=()) -> dict[str, int]:
    """Tensor -> shard number, by cumulative size in the given order; then the first tensor ending in each
    partners[i][0] goes to another shard than its partner (same stem, ending partners[i][1]), so that
    readers must fetch partners across shards."""
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    per_shard = sum(sizes) / num_shards
    shard_of, acc = {}, 0
    for n, size in zip(names, sizes):
        shard_of[n] = min(int(acc // per_shard), num_shards - 1)
        acc += size
    if num_shards < 2:
        return shard_of
    for suffix, partner_suffix in partners:
        for n in [n for n in names if n.endswith(suffix)][:1]:
            partner = n[: -len(suffix)] + partner_suffix
            if partner in shard_of and shard_of[partner] == shard_of[n]:
                shard_of[n] = 0 if shard_of[partner] == num_shards - 1 else num_shards - 1
    return shard_of


def write_shards(out: Path, tensors: dict[str, torch.Tensor], shard_of: dict[str, int], num_shards: int) -> None:
    """`model-0000i-of-0000n.safetensors` files and model.safetensors.index.json (with metadata.total_size)."""
    files = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {}
    for i, fname in enumerate(files):
        part = {n: t.contiguous() for n, t in tensors.items() if shard_of[n] == i}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_side_files(out: Path, cfg: dict) -> None:
    """config.json, generation_config.json and the byte-level tokenizer files beside the weights."""
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6,
         "top_p": 0.95, "transformers_version": "4.46.3"}, indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(_tokenizer_json(), ensure_ascii=False) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "add_bos_token": True,
         "model_max_length": cfg["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast"},
        ensure_ascii=False, indent=2) + "\n")


def make_synthetic_checkpoint(
    path, *, variant: str = "v3", source: str = "bf16", num_shards: int = 3, seed: int = 0, **config_overrides
) -> Path:
    """Write a synthetic DeepSeek checkpoint into `path` (created) and return it as a Path.

    Args:
        variant: "v3" | "v3.2" | "v2-lite" | "kimi-k2".
        source: "bf16" (all BF16, router bias FP32) | "fp8" (DeepSeek native FP8 block weights with
            float32 `weight_scale_inv`) | "fp8-ue8m0" (the same with power-of-two scales, `scale_fmt: ue8m0`).
        num_shards: number of `model-0000i-of-0000n.safetensors` files (>= 1).
        config_overrides: config.json keys to change (e.g. hidden_size=1024 for a larger benchmark
            model); an unknown key is a ValueError, so a typo cannot silently build another model.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown synthetic source {source!r}; choose one of {SOURCES}")
    cfg = variant_config(variant)
    optional = {"q_lora_rank", "num_nextn_predict_layers", "index_n_heads", "index_head_dim", "index_topk"}
    unknown = sorted(set(config_overrides) - set(cfg) - optional)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(set(cfg) | optional)}")
    cfg.update(config_overrides)
    if source != "bf16":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
        if source == "fp8-ue8m0":
            cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    tensors: dict[str, torch.Tensor] = {}
    for name, shape, kind in tensor_specs(cfg):
        t = _make_tensor(shape, kind, gen)
        if kind == "linear" and source != "bf16":
            q, s = quantize_fp8_block(t, ue8m0=source == "fp8-ue8m0", name=name)
            tensors[name], tensors[name + "_scale_inv"] = q, s
        else:
            tensors[name] = t

    write_shards(out, tensors, assign_shards(tensors, num_shards, V3_PARTNERS), num_shards)
    write_side_files(out, cfg)
    return out
