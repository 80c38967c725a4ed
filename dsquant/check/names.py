"""DeepSeek module roles, expected shapes, fused partners, and what format a module's tensors are in.

Everything here works from tensor names, dtypes and shapes alone (plus config.json), so it reads a
checkpoint written by dsquant, ModelOpt, llm-compressor or DeepSeek's own tools the same way.
"""

from __future__ import annotations

import re

from dsquant.checkpoint import names_v4
from dsquant.checkpoint.index import TensorInfo
from dsquant.checkpoint.names import layer_index
from dsquant.checkpoint.names_v4 import is_v4
from dsquant.formats.registry import find

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FLOAT_FORMATS = {"BF16": "bf16", "F16": "f16", "F32": "f32", "F64": "f64"}
# Parameters that only a quantized module carries (any convention).
SCALE_PARAMS = (
    "weight_scale", "weight_scale_inv", "weight_scale_2", "weight_global_scale", "input_scale",
    "input_global_scale", "weight_zero_point", "weight_g_idx", "weight_shape",
)
# Projections engines build with the checkpoint's quant config (the V3.2 indexer's wq_b and wk too; its
# weights_proj is built unquantized, like the router).
_LINEAR_TAIL = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b|indexer\.wk)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))$"
)


def num_layers(config: dict | None) -> int | None:
    n = (config or {}).get("num_hidden_layers")
    return n if isinstance(n, int) else None


def is_mtp(name: str, config: dict | None) -> bool:
    """Layer ids at or past num_hidden_layers are the MTP (next-token prediction) layers."""
    n, li = num_layers(config), layer_index(name)
    return n is not None and li is not None and li >= n


def is_decoder_linear(module: str) -> bool:
    """A projection that engines build as a (possibly quantized) linear layer, by its HF name."""
    return bool(_LINEAR_TAIL.search(module))


def role(module: str, config: dict | None) -> str:
    """Tensor group used in summaries: attention, dense MLP, experts, router, norms, ..."""
    if is_v4(config):
        return names_v4.role(module)
    if is_mtp(module, config):
        return "mtp"
    tail = module.rsplit(".", 1)[-1]
    if module.endswith("embed_tokens"):
        return "embeddings"
    if module == "lm_head" or module.endswith(".lm_head"):
        return "lm_head"
    if "norm" in tail:
        return "norms"
    if ".mlp.experts." in module:
        return "routed experts"
    if ".mlp.shared_experts." in module:
        return "shared experts"
    if module.endswith(".mlp.gate"):
        return "router"
    if ".self_attn.indexer" in module:
        return "indexer"
    if ".self_attn" in module:
        return "attention"
    if ".mlp." in module:
        return "dense MLP"
    return "other"


def module_format(params: dict[str, TensorInfo]) -> str | None:
    """The storage format of one module from its parameter names, dtypes and shapes; None if it has no weight."""
    w = params.get("weight_packed") or params.get("weight")
    if w is None:
        return None
    scale = params.get("weight_scale")
    v4_scale = params.get("scale")  # DeepSeek-V4 names the scale of `weight` just `scale`
    if v4_scale is not None and w.st_dtype == "I8" and v4_scale.st_dtype == "F8_E8M0":
        return "mxfp4"
    if v4_scale is not None and w.st_dtype in FP8_DTYPES:
        return "fp8-block"
    if w.st_dtype == "U8":
        if scale is not None and scale.st_dtype in ("U8", "F8_E8M0"):
            return "mxfp4"
        e4m3_scale = scale is not None and scale.st_dtype == "F8_E4M3"
        if e4m3_scale or "weight_scale_2" in params or "weight_global_scale" in params:
            return "nvfp4"
        return "uint8"
    if w.st_dtype == "I32" and "weight_packed" in params:
        return "int-packed"
    if w.st_dtype in FP8_DTYPES or w.st_dtype == "I8":
        base = "fp8" if w.st_dtype in FP8_DTYPES else "int8"
        if "weight_scale_inv" in params:
            return f"{base}-block"
        if scale is None:
            return f"{base}-noscale"
        n = w.shape[0] if w.shape else 0
        if len(scale.shape) == 0 or scale.shape in ((1,), (1, 1)):
            return f"{base}-tensor"
        if len(scale.shape) == 2 and scale.shape[0] == n and scale.shape[1] == 1:
            return f"{base}-channel"
        return f"{base}-block"
    return FLOAT_FORMATS.get(w.st_dtype, w.st_dtype.lower())


def is_quantized(fmt: str | None) -> bool:
    return fmt is not None and fmt not in FLOAT_FORMATS.values()


def fp4_group(fmt: str | None) -> int | None:
    """Elements per scale along K of a packed FP4 format (NVFP4 16, MXFP4 32); None for any other label."""
    entry = find(fmt)
    return entry.block[1] if entry is not None and entry.packed else None


def logical_shape(params: dict[str, TensorInfo], fmt: str | None) -> tuple[int, ...] | None:
    """[N, K] of the unpacked weight (FP4 packs two elements per byte along K)."""
    w = params.get("weight_packed") or params.get("weight")
    if w is None or len(w.shape) != 2:
        return w.shape if w is not None else None
    entry = find(fmt)
    return entry.logical_shape(w.shape) if entry is not None else w.shape


def expected_shape(module: str, config: dict | None) -> tuple[int, int] | None:
    """[N, K] that config.json implies for a DeepSeek projection; None when unknown or not derivable."""
    c = config or {}
    h, heads = c.get("hidden_size"), c.get("num_attention_heads")
    nope, rope, v = c.get("qk_nope_head_dim"), c.get("qk_rope_head_dim"), c.get("v_head_dim")
    q_rank, kv_rank = c.get("q_lora_rank"), c.get("kv_lora_rank")
    tail = module.rsplit(".", 1)[-1]
    if ".mlp.experts." in module:
        inter = lambda: c["moe_intermediate_size"]
    elif ".mlp.shared_experts." in module:
        inter = lambda: c["moe_intermediate_size"] * c.get("n_shared_experts", 1)
    else:
        inter = lambda: c["intermediate_size"]
    table = {
        "q_a_proj": lambda: (q_rank, h),
        "q_b_proj": lambda: (heads * (nope + rope), q_rank),
        "q_proj": lambda: (heads * (nope + rope), h),
        "kv_a_proj_with_mqa": lambda: (kv_rank + rope, h),
        "kv_b_proj": lambda: (heads * (nope + v), kv_rank),
        "o_proj": lambda: (h, heads * v),
        "gate_proj": lambda: (inter(), h),
        "up_proj": lambda: (inter(), h),
        "down_proj": lambda: (h, inter()),
        "wq_b": lambda: (c["index_n_heads"] * c["index_head_dim"], q_rank),
        "wk": lambda: (c["index_head_dim"], h),
    }
    if tail not in table:
        return None
    try:
        shape = table[tail]()  # lazy: V2-Lite has no q_lora_rank, dense-only configs no MoE sizes
    except (KeyError, TypeError):
        return None
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return shape
