"""Tiny synthetic DeepSeek-V4 checkpoints in the exact official layout and dtypes (deepseek-v4.md section 1).

`make_synthetic_v4_checkpoint(path, variant=...)` writes unprefixed official names with `.scale` suffixes, every
tensor that config.json implies (dsquant.checkpoint.names_v4.expected_tensors), over several shards with an
index, plus config.json with the release's fields, generation_config.json and tokenizer files:

    "flash"       instruct (V4-Flash / Pro): dense linears F8_E4M3 with F8_E8M0 128x128 `.scale` grids; routed
                  experts FP4, two E2M1 codes per I8 byte (even K in the low nibble) with one F8_E8M0 scale per
                  32 along K; `expert_dtype: "fp4"`; the 1-stage MTP draft `mtp.0` (e_proj / h_proj / enorm /
                  hnorm / norm / hc_head_*).
    "flash-base"  -Base: experts F8_E4M3 too, and every `.scale` F32 (`expert_dtype: "fp8"`). The Base
                  quantization_config is not published first-hand; it keeps instruct's `scale_fmt: ue8m0`, as one
                  third-party table lists it, and the F32 scales are powers of two accordingly.
    "flash-0731"  the 0731 / 0813 refresh: as "flash", with the 3-stage DSpark draft `mtp.0..2` (main_proj and
                  main_norm on stage 0; norm, hc_head_*, markov_head and confidence_head on the last) and the
                  dspark_* config keys.
Everywhere: F32 `hc_*`, `attn_sink`, compressor `ape`, router `gate.bias`; I64 `tid2eid` on the hash layers;
BF16 embed / head / norms / router weight / compressor wkv, wgate / indexer weights_proj.

Layers follow `compress_ratios` as Flash does: two sliding-window layers, then CSA (ratio 4: compressor +
indexer) and HCA (ratio 128: compressor) alternating, a trailing 0 per draft stage; the first num_hash_layers
layers route by token id. Every quantized dim is a multiple of 128 (K of FP4 experts a multiple of 32), as in
the releases, so 128x128 grids have no ragged edge.

Values: seeded random weights quantized by dsquant.formats (FP8 blocks with power-of-two scales, which E8M0
holds exactly; MXFP4 with the OCP exponent rule), so dequantizing the stored bytes gives exactly what the scales
say. Same arguments, same bytes. 6 to 8 MB at the default size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsquant.checkpoint.names_v4 import expected_tensors, scale_name
from dsquant.checkpoint.synth import assign_shards, write_shards, write_side_files
from dsquant.formats.fp8 import quantize_fp8_block
from dsquant.formats.mxfp4 import e8m0_from_float, quantize_mxfp4

V4_VARIANTS = ("flash", "flash-base", "flash-0731")

# Flash's config.json (deepseek-v4.md 1.6) at a small size: every field the release ships, dims shrunk.
_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "vocab_size": 512,
    "hidden_size": 256,
    "num_hidden_layers": 5,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_lora_rank": 128,
    "o_groups": 2,
    "moe_intermediate_size": 128,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hidden_act": "silu",
    "sliding_window": 128,
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1048576,
    "index_n_heads": 2,
    "index_head_dim": 128,
    "index_topk": 8,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-06,
    "rms_norm_eps": 1e-06,
    "num_nextn_predict_layers": 1,
    "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "compress_ratios": [0, 0, 4, 128, 4, 0],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}
# What the 0731 refresh adds: a 3-stage DSpark draft fed by the last three layers.
_DSPARK = {"dspark_block_size": 5, "dspark_noise_token_id": 500, "dspark_markov_rank": 64}
DSPARK_STAGES = 3


def v4_config(variant: str) -> dict:
    """config.json of a synthetic V4 variant (DeepSeek's own keys)."""
    if variant not in V4_VARIANTS:
        raise ValueError(f"unknown synthetic V4 variant {variant!r}; choose one of {V4_VARIANTS}")
    cfg = json.loads(json.dumps(_FLASH))
    if variant == "flash-base":
        cfg["expert_dtype"] = "fp8"
    if variant == "flash-0731":
        n = cfg["num_hidden_layers"]
        cfg.update(_DSPARK, dspark_target_layer_ids=list(range(n - DSPARK_STAGES, n)))
        cfg["compress_ratios"] = cfg["compress_ratios"][:n] + [0] * DSPARK_STAGES
    return cfg


def _random(shape: tuple, kind: str, name: str, gen: torch.Generator) -> torch.Tensor:
    """float32 values of one tensor before it is stored: weights with row-varying magnitudes (so per-block scales
    differ), norms near 1, small mHC / sink / position / bias parameters."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if kind == "f32":
        return 0.1 * torch.randn(shape, generator=gen)
    rows = torch.exp(0.5 * torch.randn((shape[0], 1), generator=gen))
    return 0.02 * rows * torch.randn(shape, generator=gen)


def _fp8(w: torch.Tensor, e8m0: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_fp8_block(w, ue8m0=True, name=name)
    return q, (e8m0_from_float(scale) if e8m0 else scale)


def v4_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the official layout for `cfg`, in checkpoint order, as stored (dtype and shape)."""
    gen = torch.Generator().manual_seed(seed)

    def value(spec) -> torch.Tensor:
        if spec.kind == "i64":  # tid2eid: num_experts_per_tok distinct experts for every token id
            ranks = torch.rand((spec.shape[0], cfg["n_routed_experts"]), generator=gen).argsort(dim=1)
            return ranks[:, : spec.shape[1]].contiguous()
        return _random(spec.shape, spec.kind, spec.name, gen)

    return store_v4_tensors(cfg, value)


def store_v4_tensors(cfg: dict, value) -> dict[str, torch.Tensor]:
    """The official layout for `cfg` with the values `value(spec)` gives (float, or int64 for tid2eid), called once
    per names_v4.Spec in checkpoint order, stored as the release stores each kind: dense linears FP8 with
    power-of-two 128x128 scales (F8_E8M0 beside FP4 experts, F32 beside FP8 ones), routed experts MXFP4 (I8 +
    F8_E8M0 per 32) or FP8, the rest BF16 / F32 / I64."""
    fp4 = cfg.get("expert_dtype", "fp4") == "fp4"
    out: dict[str, torch.Tensor] = {}
    for spec in expected_tensors(cfg):
        w = value(spec)
        if tuple(w.shape) != tuple(spec.shape):
            raise ValueError(f"{spec.name}: value of shape {tuple(w.shape)}, the layout needs {tuple(spec.shape)}")
        if spec.kind == "i64":
            out[spec.name] = w.long().contiguous()
        elif spec.kind == "f32":
            out[spec.name] = w.float()
        elif spec.kind == "bf16":
            out[spec.name] = w.to(torch.bfloat16)
        elif spec.kind == "expert" and fp4:
            packed, scale = quantize_mxfp4(w.float(), name=spec.name)
            out[spec.name], out[scale_name(spec.name)] = packed.view(torch.int8), scale.view(torch.float8_e8m0fnu)
        else:
            out[spec.name], out[scale_name(spec.name)] = _fp8(w.float(), fp4, spec.name)
    return out


# Partners a reader fetches together, put in different shards: w1/w3 of one expert, an expert's weight and its
# scale, wq_a/wkv (which vLLM fuses), and a dense FP8 weight and its scale.
V4_PARTNERS = ((".ffn.experts.0.w3.weight", ".ffn.experts.0.w1.weight"),
               (".ffn.experts.1.w2.scale", ".ffn.experts.1.w2.weight"),
               (".attn.wkv.weight", ".attn.wq_a.weight"),
               (".attn.wo_b.scale", ".attn.wo_b.weight"))


def make_synthetic_v4_checkpoint(path, *, variant: str = "flash", num_shards: int = 4, seed: int = 0,
                                 **config_overrides) -> Path:
    """Write a synthetic DeepSeek-V4 checkpoint into `path` (created) and return it as a Path.

    Args:
        variant: "flash" | "flash-base" | "flash-0731" (module docstring).
        num_shards: number of `model-0000i-of-0000n.safetensors` files.
        config_overrides: config.json keys to change (e.g. n_routed_experts=8); an unknown key is a ValueError,
            so that a typo cannot silently build another model.
    """
    cfg = v4_config(variant)
    unknown = sorted(set(config_overrides) - set(cfg))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(cfg)}")
    cfg.update(config_overrides)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = v4_tensors(cfg, seed)
    write_shards(out, tensors, assign_shards(tensors, num_shards, V4_PARTNERS), num_shards)
    write_side_files(out, cfg)
    return out
