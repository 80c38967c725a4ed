"""DeepSeek checkpoint name tables: supported architectures, MTP layers, fused partners, name patterns.

Names are the Hugging Face checkpoint names (`model.layers.{L}.mlp.experts.{E}.gate_proj.weight`),
formats.md section 1.2. A *module* is a tensor name without its last component (`.weight`,
`.weight_scale_inv`, `.e_score_correction_bias`); recipes match module names.
"""

from __future__ import annotations

import re

# The model families dsquant tells apart: the DeepSeek-V3 layout (V2, V3, V3.1, V3.2, R1, Kimi-K2) and
# DeepSeek-V4's official layout (checkpoint.names_v4).
V3, V4 = "deepseek_v3", "deepseek_v4"

# architectures -> the model_type values seen with them (Kimi-K2 ships DeepseekV3ForCausalLM as kimi_k2;
# DeepSeek-V3.2 names its own class because of the indexer tensors).
SUPPORTED_ARCHITECTURES = {
    "DeepseekV3ForCausalLM": ("deepseek_v3", "kimi_k2"),
    "DeepseekV32ForCausalLM": ("deepseek_v32",),
    "DeepseekV2ForCausalLM": ("deepseek_v2",),
}

# Leaf names of the projections that engines fuse into one matrix (formats.md section 8 item 4):
# vLLM/SGLang gate_up_proj / w13, and fused_qkv_a_proj = [q_a_proj; kv_a_proj_with_mqa] (q_a first).
DEFAULT_FUSED_GROUPS = (("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))

# DeepSeek's own rule: every 1-byte weight X has a float32 partner X_scale_inv (fp8_cast_bf16.py).
FP8_SCALE_SUFFIX = "_scale_inv"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.")
# DeepSeek-V4's official names start with `layers.L.` / `mtp.S.` (no `model.` prefix)
_GENERALIZE = ((re.compile(r"(^|\.)layers\.\d+\."), r"\1layers.*."), (re.compile(r"^mtp\.\d+\."), "mtp.*."),
               (re.compile(r"\.experts\.\d+\."), ".experts.*."))


def check_architecture(config: dict, where: str) -> str:
    """Return the architecture name, or raise ValueError saying what is supported."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ValueError(
        f"{where}: architectures {archs or '(missing)'} (model_type {config.get('model_type')!r}) is not a "
        f"DeepSeek-family model; dsquant converts {supported}"
    )


def mtp_layers(config: dict) -> tuple[int, ...]:
    """Layer indices of the multi-token-prediction modules: num_hidden_layers .. + num_nextn_predict_layers - 1."""
    n = int(config.get("num_hidden_layers", 0))
    return tuple(range(n, n + int(config.get("num_nextn_predict_layers", 0) or 0)))


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def expert_index(name: str) -> int | None:
    m = _EXPERT_RE.search(name)
    return int(m.group(1)) if m else None


def layer_prefix(family: str, layer: int) -> str:
    """The name prefix of decoder layer `layer`'s tensors and modules: V3's `model.layers.L`, the official
    unprefixed `layers.L` of DeepSeek-V4."""
    return f"{'layers' if family == V4 else 'model.layers'}.{layer}"


def module_of(tensor_name: str) -> str:
    """`a.b.weight` -> `a.b`; a top-level name stays itself."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def leaf_of(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def parent_of(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def generalize(name: str) -> str:
    """Replace layer and expert indices by `*`, for plan tables and generalized ignore/target lists."""
    for pattern, repl in _GENERALIZE:
        name = pattern.sub(repl, name)
    return name


def is_scale_name(tensor_name: str) -> bool:
    return tensor_name.endswith(".weight" + FP8_SCALE_SUFFIX)


def fused_group_key(module: str, groups=DEFAULT_FUSED_GROUPS) -> tuple[str, int] | None:
    """(parent module, group id) when the module is a member of a fused group, else None."""
    leaf = leaf_of(module)
    for gid, members in enumerate(groups):
        if leaf in members:
            return parent_of(module), gid
    return None
