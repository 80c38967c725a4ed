"""DeepSeek-V4 checkpoints as data: the official tensor inventory that config.json implies, what must stay
unquantized, and how to tell the family and the transformers-5 namespace apart (deepseek-v4.md sections 1-2).

Official names are unprefixed, with `.scale` (not `weight_scale_inv`) next to every quantized weight:

    embed.weight, head.weight, norm.weight, hc_head_{fn,base,scale}
    layers.L.{hc_attn,hc_ffn}_{fn,base,scale}, layers.L.{attn,ffn}_norm.weight
    layers.L.attn.{attn_sink, wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b}
    layers.L.attn.compressor.{ape, wkv, wgate, norm}            compress ratio 4 (CSA) or 128 (HCA)
    layers.L.attn.indexer.{compressor.{ape,wkv,wgate,norm}, wq_b, weights_proj}   CSA only
    layers.L.ffn.gate.{weight, bias | tid2eid}                  tid2eid on the first num_hash_layers layers
    layers.L.ffn.experts.E.w{1,2,3}, layers.L.ffn.shared_experts.w{1,2,3}
    mtp.S.<a block as above>                                    the draft: MTP (V4, Pro) or DSpark (0731, 0813)

Each block is a `Block`; `expected_tensors(config)` lists every tensor as a `Spec` (name, logical shape, kind),
where kind says how the official checkpoint stores it:
    "fp8"     F8_E4M3 weight + `.scale` grid [ceil(N/128), ceil(K/128)]: F8_E8M0 next to FP4 experts, F32 next to
              FP8 experts (vLLM DeepseekV4FP8Config: is_scale_e8m0 = expert_dtype == "fp4")
    "expert"  a routed expert: expert_dtype "fp4" = I8 [N, K/2] (two E2M1 codes a byte, even K in the low nibble)
              + F8_E8M0 `.scale` [N, K/32]; "fp8" = as "fp8" with F32 scales (the -Base releases)
    "bf16", "f32", "i64"   stored as that dtype, never quantized (KEEP says why for each).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dsquant.formats.fp8 import FP8_BLOCK
from dsquant.formats.mxfp4 import MXFP4_BLOCK as FP4_GROUP

ARCHITECTURES = {"DeepseekV4ForCausalLM": ("deepseek_v4",)}
MODEL_TYPES = ("deepseek_v4",)
EXPERT_DTYPES = ("fp4", "fp8")
# vLLM reads expert_dtype from config.json and assumes FP4 experts when the key is missing.
ENGINE_DEFAULT_EXPERT_DTYPE = "fp4"
ATTENTION_OF_RATIO = {0: "sliding", 4: "csa", 128: "hca"}
# transformers' DeepseekV4Config default compress_rates (layer_types in place of compress_ratios)
TRANSFORMERS_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
KINDS = ("fp8", "expert", "bf16", "f32", "i64")
# safetensors dtypes of the official layout
STORED_DTYPE = {"bf16": "BF16", "f32": "F32", "i64": "I64"}


def is_v4(config: dict | None) -> bool:
    """A DeepSeek-V4 config.json (architectures or model_type)."""
    c = config or {}
    archs = c.get("architectures") or []
    return any(a in ARCHITECTURES for a in archs) or c.get("model_type") in MODEL_TYPES


def expert_dtype(config: dict | None) -> str | None:
    """config.json's top-level `expert_dtype` ("fp4" | "fp8"), or quantization_config's copy; None if absent."""
    c = config or {}
    value = c.get("expert_dtype")
    if value is None and isinstance(c.get("quantization_config"), dict):
        value = c["quantization_config"].get("expert_dtype")
    return value


def dense_scale_dtype(expert: str) -> str:
    """Stored dtype of the dense FP8 `.scale` grids that engines require beside experts of format `expert`."""
    return "F8_E8M0" if expert == "fp4" else "F32"


@dataclass(frozen=True)
class Block:
    """One transformer block of the checkpoint: a backbone layer or a draft stage."""

    prefix: str  # "layers.L" | "mtp.S"
    compress_ratio: int  # 0 sliding window only, 4 CSA (compressor + indexer), 128 HCA (compressor)
    hash_routing: bool  # ffn.gate.tid2eid (token-id routing) instead of ffn.gate.bias
    draft: str | None = None  # None (backbone) | "mtp" | "dspark"
    stage: int = 0
    stages: int = 0  # draft stages in all (0 for the backbone)

    @property
    def attention(self) -> str:
        return ATTENTION_OF_RATIO.get(self.compress_ratio, f"ratio-{self.compress_ratio}")

    @property
    def has_compressor(self) -> bool:
        return self.compress_ratio > 0

    @property
    def has_indexer(self) -> bool:
        return self.compress_ratio == 4


def draft_kind(config: dict) -> str | None:
    """"dspark" (0731 / 0813: a dspark_* config key), "mtp" (num_nextn_predict_layers > 0), or None."""
    if any(k.startswith("dspark_") for k in config):
        return "dspark"
    return "mtp" if int(config.get("num_nextn_predict_layers") or 0) > 0 else None


def draft_stages(config: dict) -> int:
    """MTP: num_nextn_predict_layers. DSpark: the compress_ratios entries past the backbone (one per stage)."""
    kind = draft_kind(config)
    if kind == "dspark":
        return max(len(config.get("compress_ratios") or []) - int(config["num_hidden_layers"]), 1)
    return int(config.get("num_nextn_predict_layers") or 0) if kind == "mtp" else 0


def _ratios_and_hash(config: dict, n: int) -> tuple[list, list[bool]]:
    """Per-layer compress ratios and hash routing: DeepSeek's compress_ratios / num_hash_layers, or the layer_types /
    mlp_layer_types that transformers' DeepseekV4Config writes instead when it saves."""
    ratios = config.get("compress_ratios")
    if ratios is None and isinstance(config.get("layer_types"), list):
        rates = {**TRANSFORMERS_COMPRESS_RATES, **(config.get("compress_rates") or {})}
        ratios = [0 if t == "sliding_attention" else rates.get(t, t) for t in config["layer_types"]]
    n_hash = int(config.get("num_hash_layers") or 0)
    hashed = [i < n_hash for i in range(n)]
    if "num_hash_layers" not in config and isinstance(config.get("mlp_layer_types"), list):
        hashed = [t == "hash_moe" for t in config["mlp_layer_types"]] + [False] * n
    return ratios, hashed[:n]


def blocks(config: dict) -> list[Block]:
    """Backbone layers then draft stages. ValueError naming the field when config.json cannot describe them."""
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"config.json: num_hidden_layers {n!r} is not a positive integer")
    ratios, hashed = _ratios_and_hash(config, n)
    if not isinstance(ratios, list) or len(ratios) < n:
        raise ValueError(f"config.json: compress_ratios must list one ratio per layer ({n}), got {ratios!r}")
    bad = sorted({r for r in ratios if r not in ATTENTION_OF_RATIO}, key=str)
    if bad:
        raise ValueError(f"config.json: compress_ratios holds {bad}; V4 layers use {sorted(ATTENTION_OF_RATIO)}")
    out = [Block(f"layers.{i}", ratios[i], hashed[i]) for i in range(n)]
    kind, stages = draft_kind(config), draft_stages(config)
    for s in range(stages):
        ratio = ratios[n + s] if n + s < len(ratios) else 0
        out.append(Block(f"mtp.{s}", ratio, False, kind, s, stages))
    return out


@dataclass(frozen=True)
class Spec:
    """One tensor (or, for kinds fp8 / expert, one quantized weight and its `.scale`) of the official layout."""

    name: str  # the tensor name; for fp8 / expert the `.weight` (its scale is scale_name(name))
    shape: tuple[int, ...]  # logical shape ([N, K] of a linear, before FP4 packing)
    kind: str  # one of KINDS


def scale_name(weight_name: str) -> str:
    """`X.weight` -> `X.scale` (the official suffix; transformers' loader renames it to weight_scale_inv)."""
    return weight_name[: -len(".weight")] + ".scale"


def stored_tensors(spec: Spec, expert: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(name, safetensors dtype, shape)] the official checkpoint stores for one Spec, experts in format `expert`."""
    if spec.kind in STORED_DTYPE:
        return [(spec.name, STORED_DTYPE[spec.kind], spec.shape)]
    n, k = spec.shape
    if spec.kind == "expert" and expert == "fp4":
        return [(spec.name, "I8", (n, k // 2)), (scale_name(spec.name), "F8_E8M0", (n, k // FP4_GROUP))]
    grid = (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    return [(spec.name, "F8_E4M3", (n, k)), (scale_name(spec.name), dense_scale_dtype(expert), grid)]


def _hc(p: str, which: str, c: dict) -> list[Spec]:
    hc, d = c["hc_mult"], c["hidden_size"]
    mix = (2 + hc) * hc if which != "head" else hc
    name = f"{p}hc_{which}_"
    return [Spec(name + "fn", (mix, hc * d), "f32"), Spec(name + "base", (mix,), "f32"),
            Spec(name + "scale", (3 if which != "head" else 1,), "f32")]


def _compressor(p: str, ratio: int, width: int, norm: int, d: int) -> list[Spec]:
    """A compressor pooling `ratio` tokens; `width` = 2x the head dim for the overlapping CSA pooling."""
    return [Spec(p + "ape", (ratio, width), "f32"), Spec(p + "wkv.weight", (width, d), "bf16"),
            Spec(p + "wgate.weight", (width, d), "bf16"), Spec(p + "norm.weight", (norm,), "bf16")]


def _attention(p: str, b: Block, c: dict) -> list[Spec]:
    d, heads, hd, q = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    groups, o_rank = c["o_groups"], c["o_lora_rank"]
    out = [Spec(p + "attn_sink", (heads,), "f32"), Spec(p + "wq_a.weight", (q, d), "fp8"),
           Spec(p + "q_norm.weight", (q,), "bf16"), Spec(p + "wq_b.weight", (heads * hd, q), "fp8"),
           Spec(p + "wkv.weight", (hd, d), "fp8"), Spec(p + "kv_norm.weight", (hd,), "bf16"),
           Spec(p + "wo_a.weight", (groups * o_rank, heads * hd // groups), "fp8"),
           Spec(p + "wo_b.weight", (d, groups * o_rank), "fp8")]
    if b.has_compressor:
        width = 2 * hd if b.has_indexer else hd
        out += _compressor(p + "compressor.", b.compress_ratio, width, hd, d)
    if b.has_indexer:
        ih, idim = c["index_n_heads"], c["index_head_dim"]
        out += _compressor(p + "indexer.compressor.", b.compress_ratio, 2 * idim, idim, d)
        out += [Spec(p + "indexer.wq_b.weight", (ih * idim, q), "fp8"),
                Spec(p + "indexer.weights_proj.weight", (ih, d), "bf16")]
    return out


def _ffn(p: str, b: Block, c: dict) -> list[Spec]:
    d, e, inter = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    out = [Spec(p + "gate.weight", (e, d), "bf16")]
    if b.hash_routing:
        out.append(Spec(p + "gate.tid2eid", (c["vocab_size"], c["num_experts_per_tok"]), "i64"))
    else:
        out.append(Spec(p + "gate.bias", (e,), "f32"))
    for i in range(e):
        out += _mlp(f"{p}experts.{i}.", inter, d, "expert")
    return out + _mlp(p + "shared_experts.", inter * c.get("n_shared_experts", 1), d, "fp8")


def _mlp(p: str, inter: int, d: int, kind: str) -> list[Spec]:
    return [Spec(p + "w1.weight", (inter, d), kind), Spec(p + "w2.weight", (d, inter), kind),
            Spec(p + "w3.weight", (inter, d), kind)]


def _draft_extras(p: str, b: Block, c: dict) -> list[Spec]:
    """What a draft stage adds to its block: MTP's embedding projections and head, DSpark's input and heads."""
    d = c["hidden_size"]
    out = []
    if b.draft == "mtp":
        out += [Spec(p + "e_proj.weight", (d, d), "fp8"), Spec(p + "h_proj.weight", (d, d), "fp8"),
                Spec(p + "enorm.weight", (d,), "bf16"), Spec(p + "hnorm.weight", (d,), "bf16")]
    if b.draft == "dspark" and b.stage == 0:
        targets = len(c.get("dspark_target_layer_ids") or [])
        out += [Spec(p + "main_proj.weight", (d, targets * d), "fp8"), Spec(p + "main_norm.weight", (d,), "bf16")]
    last = b.draft == "mtp" or b.stage == b.stages - 1
    if last:
        out += [Spec(p + "norm.weight", (d,), "bf16")] + _hc(p, "head", c)
    if b.draft == "dspark" and last:
        v, rank = c["vocab_size"], c["dspark_markov_rank"]
        out += [Spec(p + "markov_head.markov_w1.weight", (v, rank), "bf16"),
                Spec(p + "markov_head.markov_w2.weight", (v, rank), "bf16"),
                Spec(p + "confidence_head.proj.weight", (1, d + rank), "bf16")]
    return out


def block_tensors(b: Block, c: dict) -> list[Spec]:
    p = b.prefix + "."
    d = c["hidden_size"]
    out = _hc(p, "attn", c) + _hc(p, "ffn", c)
    out += [Spec(p + "attn_norm.weight", (d,), "bf16"), Spec(p + "ffn_norm.weight", (d,), "bf16")]
    out += _attention(p + "attn.", b, c) + _ffn(p + "ffn.", b, c)
    return out + (_draft_extras(p, b, c) if b.draft else [])


def expected_tensors(config: dict) -> list[Spec]:
    """Every tensor of the official checkpoint that config.json describes, in checkpoint order.

    KeyError / ValueError name the missing or malformed config field."""
    c = config
    d, v = c["hidden_size"], c["vocab_size"]
    out = [Spec("embed.weight", (v, d), "bf16")]
    for b in blocks(c):
        out += block_tensors(b, c)
    return out + [Spec("norm.weight", (d,), "bf16")] + _hc("", "head", c) + [Spec("head.weight", (v, d), "bf16")]


# Tensors that stay as the official checkpoint has them whatever the recipe: (pattern over official names, why).
# The first matching entry gives the reason.
KEEP = (
    (re.compile(r"\.compressor\.(wkv|wgate)\.weight$"),
     "vLLM fuses compressor wkv+wgate into compressor.fused_wkv_wgate, which it builds unquantized (a quantized "
     "one raises NotImplementedError); SGLang concatenates them into wkv_gate as plain weights"),
    (re.compile(r"\.indexer\.weights_proj\.weight$"),
     "vLLM adds indexer.weights_proj to its ignored layers and builds it unquantized"),
    (re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$"),
     "mHC mixing parameters: engines and transformers (_keep_in_fp32_modules_strict) read them as float32"),
    (re.compile(r"\.attn_sink$"), "per-head attention sink logits, read as float32 by engines and transformers"),
    (re.compile(r"\.ape$"), "compressor position bias, float32 in every loader"),
    (re.compile(r"\.gate\.bias$"),
     "router correction bias: lower precision changes which experts are picked (transformers keeps it float32)"),
    (re.compile(r"\.gate\.tid2eid$"), "hash-routing table token -> expert ids"),
    (re.compile(r"\.gate\.weight$"), "the router: engines build it without a quantization method"),
    (re.compile(r"(^|\.)(norm|attn_norm|ffn_norm|q_norm|kv_norm|enorm|hnorm|main_norm)\.weight$"),
     "RMSNorm weights are elementwise, never GEMM operands"),
    (re.compile(r"^(embed|head)\.weight$"), "embedding and output head are kept BF16 by every V4 release"),
    (re.compile(r"\.(markov_head\.markov_w[12]|confidence_head\.proj)\.weight$"),
     "DSpark draft heads, BF16 in the release and built unquantized by the DSpark loaders"),
)


def keep_reason(name: str) -> str | None:
    """Why an official tensor must stay unquantized, or None for the quantizable linears."""
    for pattern, why in KEEP:
        if pattern.search(name):
            return why
    return None


# What transformers 5 `save_pretrained` writes instead of the official names (deepseek-v4.md 2.3): a `model.`
# prefix and its module names (self_attn / mlp / embed_tokens / hc_head. / attn_hc. / lm_head / *_proj ...).
_TRANSFORMERS_NAME = re.compile(
    r"^model\.|^lm_head\.|\.self_attn\.|\.mlp\.|(^|\.)(embed_tokens|attn_hc|ffn_hc|hc_head|input_layernorm"
    r"|post_attention_layernorm)\.|\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj|gate_proj|up_proj|down_proj)\."
    r"|\.experts\.(gate_up_proj|down_proj)|\.weight_scale_inv$|\.e_score_correction_bias$|\.sinks$"
)


def transformers_names(names) -> list[str]:
    """The names (of an otherwise V4 checkpoint) in transformers' module namespace rather than the official one."""
    return sorted(n for n in names if _TRANSFORMERS_NAME.search(n))


# What transformers 5 `save_pretrained` writes -> the official name: its conversion mapping run backwards. It keeps
# the official module names but adds `model.` and writes the few parameters it renamed on load under their own
# names; the main attention's kv_norm comes back as `attn.norm` (the reverse of the ambiguous `.norm.` -> `.kv_norm.`
# rule), which the compressors' `norm` is not.
_SAVED_TO_OFFICIAL = (
    (re.compile(r"^model\.embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^(model\.)?lm_head\.weight$"), "head.weight"),
    (re.compile(r"^model\.hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    (re.compile(r"^model\.(layers\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight"),
    (re.compile(r"^model\.(layers\.\d+\.ffn\.gate)\.e_score_correction_bias$"), r"\1.bias"),
    (re.compile(r"^model\."), ""),
)


def official_name(name: str) -> str:
    """A tensor name of transformers' saved V4 namespace (or an official one) -> the official name. ValueError for a
    name that is in neither, such as transformers' in-memory module names (self_attn, mlp, gate_up_proj)."""
    for pattern, repl in _SAVED_TO_OFFICIAL:
        new = pattern.sub(repl, name)
        if new != name:
            name = new
            break
    if _TRANSFORMERS_NAME.search(name):
        raise ValueError(f"{name}: a transformers module name with no official DeepSeek-V4 counterpart dsquant knows")
    return name


_LAYER = re.compile(r"^(layers|mtp)\.(\d+)\.")
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")
_BLOCK = re.compile(r"(layers|mtp)\.\d+")


def block_of(name: str) -> str | None:
    """`layers.3.attn.wkv.weight` -> `layers.3`; `mtp.0.e_proj.weight` -> `mtp.0`; None for root tensors."""
    m = _LAYER.match(name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def expert_of(name: str) -> int | None:
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


def role(module: str) -> str:
    """Tensor group of an official module name (a tensor name without its last part), for summaries: the V3
    groups plus compressor and mhc."""
    if module.startswith("mtp."):
        return "mtp"
    if module == "embed":
        return "embeddings"
    if module == "head":
        return "lm_head"
    for part, group in ((".ffn.experts.", "routed experts"), (".ffn.shared_experts.", "shared experts"),
                        (".ffn.gate", "router"), (".attn.indexer.", "indexer"), (".attn.compressor.", "compressor")):
        if part in module + ".":
            return group
    if module == "" or _BLOCK.fullmatch(module):  # hc_* parameters hang off the block (or the root)
        return "mhc"
    if module.rsplit(".", 1)[-1].endswith("norm"):
        return "norms"
    if ".attn." in module + ".":
        return "attention"
    return "other"
