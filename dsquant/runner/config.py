"""ModelArgs: the runner's view of a DeepSeek-family config.json (V3/R1/V3.1/V3.2, V2/V2-Lite, Kimi-K2).

Field names follow DeepSeek-V3 `inference/model.py` (`dim`, `inter_dim`, `n_dense_layers`, ...); the
mapping from the Hugging Face config keys is the table `_KEYS` below, so every key is read in one place.
V2-Lite has no `q_lora_rank` (the query is one `q_proj`); V2 routes with softmax scores (`greedy` or
`group_limited_greedy`), V3/Kimi-K2 with sigmoid scores plus `e_score_correction_bias` (`noaux_tc`).

transformers >= 5 moved some keys (`rope_fields`, `dtype_field` read both layouts): the RoPE base and scaling
live in one `rope_parameters` object (`rope_theta` plus `rope_type` and the YaRN fields) instead of the
top-level `rope_theta` and `rope_scaling`, and `torch_dtype` became `dtype`. A config carrying both layouts
must say the same thing in each, or it is refused: there is no telling which one its producer meant.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM")

# ModelArgs field -> (config.json key, default when the key is absent)
_KEYS = {
    "vocab_size": ("vocab_size", None),
    "dim": ("hidden_size", None),
    "inter_dim": ("intermediate_size", None),
    "moe_inter_dim": ("moe_intermediate_size", None),
    "n_layers": ("num_hidden_layers", None),
    "n_dense_layers": ("first_k_dense_replace", 0),
    "moe_layer_freq": ("moe_layer_freq", 1),
    "n_heads": ("num_attention_heads", None),
    "n_routed_experts": ("n_routed_experts", 0),
    "n_shared_experts": ("n_shared_experts", 0),
    "n_activated_experts": ("num_experts_per_tok", 0),
    "n_expert_groups": ("n_group", 1),
    "n_limited_groups": ("topk_group", 1),
    "score_func": ("scoring_func", None),
    "topk_method": ("topk_method", None),
    "route_scale": ("routed_scaling_factor", 1.0),
    "norm_topk_prob": ("norm_topk_prob", None),
    "q_lora_rank": ("q_lora_rank", 0),
    "kv_lora_rank": ("kv_lora_rank", None),
    "qk_nope_head_dim": ("qk_nope_head_dim", None),
    "qk_rope_head_dim": ("qk_rope_head_dim", None),
    "v_head_dim": ("v_head_dim", None),
    "max_position_embeddings": ("max_position_embeddings", 4096),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "n_mtp_layers": ("num_nextn_predict_layers", 0),
    "tie_word_embeddings": ("tie_word_embeddings", False),
    "bos_token_id": ("bos_token_id", None),
    "eos_token_id": ("eos_token_id", None),
}


@dataclass
class ModelArgs:
    """Architecture hyper-parameters (names after DeepSeek-V3 inference/model.py)."""

    vocab_size: int = 258
    dim: int = 256
    inter_dim: int = 512
    moe_inter_dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1
    moe_layer_freq: int = 1
    n_heads: int = 4
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    q_lora_rank: int = 128
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    dtype: str | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    n_mtp_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """vLLM/transformers rule: MoE from first_k_dense_replace on, every moe_layer_freq-th layer."""
        return self.n_routed_experts > 0 and layer >= self.n_dense_layers and layer % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (DeepSeek `MLA.__init__`, HF `yarn_apply_mscale`)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if _rope_type(rs) == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale = scale * m * m
        return scale

    @classmethod
    def from_config(cls, config: dict, *, name: str = "config.json") -> ModelArgs:
        """Parse a DeepSeek-family config dict; ValueError names the file and the problem."""
        archs = config.get("architectures") or []
        if archs and not any(a in ARCHITECTURES for a in archs):
            raise ValueError(f"{name}: unsupported architecture {archs}; expected one of {ARCHITECTURES}")
        kwargs: dict = {}
        for attr, (key, default) in _KEYS.items():
            value = config.get(key, default)
            if value is None and default is None and attr not in ("score_func", "topk_method", "norm_topk_prob",
                                                                  "bos_token_id", "eos_token_id"):
                raise ValueError(f"{name}: missing required key {key!r}")
            kwargs[attr] = value
        kwargs["q_lora_rank"] = kwargs["q_lora_rank"] or 0
        v3 = any("V3" in a for a in archs) or str(config.get("model_type", "")).startswith(("deepseek_v3", "kimi"))
        if kwargs["score_func"] is None:
            kwargs["score_func"] = "sigmoid" if v3 else "softmax"
        if kwargs["topk_method"] is None:
            kwargs["topk_method"] = "noaux_tc" if kwargs["score_func"] == "sigmoid" else "greedy"
        if kwargs["norm_topk_prob"] is None:
            kwargs["norm_topk_prob"] = kwargs["score_func"] == "sigmoid"
        if kwargs["score_func"] not in ("sigmoid", "softmax"):
            raise ValueError(f"{name}: unsupported scoring_func {kwargs['score_func']!r}")
        if kwargs["topk_method"] not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ValueError(f"{name}: unsupported topk_method {kwargs['topk_method']!r}")
        kwargs["rope_theta"], kwargs["rope_scaling"] = rope_fields(config, name)
        kwargs["dtype"] = dtype_field(config, name)
        known = {k for k, _ in _KEYS.values()} | set(MOVED_KEYS)
        kwargs["extra"] = {k: v for k, v in config.items() if k not in known}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path}: no config.json")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_config(config, name=str(path))

    def to_config(self) -> dict:
        """The inverse of from_config: Hugging Face config.json keys (DeepseekV3ForCausalLM)."""
        out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for attr, (key, _) in _KEYS.items():
            out[key] = getattr(self, attr)
        out["q_lora_rank"] = self.q_lora_rank or None
        out["num_key_value_heads"] = self.n_heads
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = self.rope_scaling
        out["torch_dtype"] = self.dtype or "bfloat16"
        out.update(self.extra)
        return out

    def replace(self, **changes) -> ModelArgs:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelArgs(**values)


def _rope_type(rs: dict) -> str:
    return str(rs.get("rope_type") or rs.get("type") or "default")


# Keys transformers >= 5 renamed or regrouped, read only through rope_fields / dtype_field.
MOVED_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype")
DEFAULT_ROPE_THETA = 10000.0
# RoPE variants the runner computes (kernels.rope.reference: plain RoPE and DeepSeek's YaRN).
ROPE_TYPES = ("default", "yarn")


def layout_disagreements(config: dict) -> list[tuple[str, str]]:
    """Fields a config.json states in both layouts with different values: ("rope" | "dtype", phrase) each.

    transformers < 5: top-level `rope_theta`, `rope_scaling` ({"type": "yarn", ...}) and `torch_dtype`.
    transformers >= 5: `rope_parameters` = {"rope_type": ..., "rope_theta": ..., <scaling fields>} and `dtype`.
    """
    out = []
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    scaling = config.get("rope_scaling") if isinstance(config.get("rope_scaling"), dict) else {}
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if "rope_theta" in config and theta is not None and float(config["rope_theta"]) != float(theta):
        out.append(("rope", f"rope_theta {config['rope_theta']} disagrees with rope_parameters.rope_theta {theta}"))
    if params and scaling:
        if _rope_type(params) != _rope_type(scaling):
            out.append(("rope", f"rope_scaling type {_rope_type(scaling)!r} disagrees with rope_parameters "
                                f"rope_type {_rope_type(params)!r}"))
        out += [("rope", f"rope_scaling.{key} {scaling[key]!r} disagrees with rope_parameters.{key} {params[key]!r}")
                for key in sorted(set(params) & set(scaling) - {"type", "rope_type"}) if params[key] != scaling[key]]
    new, old = config.get("dtype"), config.get("torch_dtype")
    if new is not None and old is not None and str(new) != str(old):
        out.append(("dtype", f"dtype {new!r} disagrees with torch_dtype {old!r}"))
    return out


def rope_fields(config: dict, name: str = "config.json") -> tuple[float, dict | None]:
    """(rope_theta, YaRN rope_scaling or None) from either layout of a config.json (see layout_disagreements);
    ValueError naming the file where the layouts disagree, or for a RoPE the runner does not compute."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name}: {key} must be an object, got {value!r}")
        if value and any(isinstance(v, dict) for v in value.values()):
            raise ValueError(f"{name}: {key} holds per-layer-type RoPE settings, which DeepSeek models do not use")
    problems = [phrase for field, phrase in layout_disagreements(config) if field == "rope"]
    if problems:
        raise ValueError(f"{name}: {problems[0]}; remove one of them")
    params, scaling = dict(params or {}), dict(scaling or {})
    theta = params.pop("rope_theta", None)
    theta = float(theta if theta is not None else config.get("rope_theta", DEFAULT_ROPE_THETA))
    merged = {**scaling, **params}
    kind = _rope_type(merged)
    if kind not in ROPE_TYPES:
        raise ValueError(f"{name}: RoPE type {kind!r} is not one the runner computes ({', '.join(ROPE_TYPES)})")
    if kind != "yarn":
        return theta, None
    merged.pop("rope_type", None)
    merged["type"] = "yarn"
    if "factor" not in merged:
        raise ValueError(f"{name}: YaRN RoPE without a factor")
    return theta, merged


def dtype_field(config: dict, name: str = "config.json") -> str | None:
    """The checkpoint's declared dtype: `dtype` (transformers >= 5) or `torch_dtype`; both must agree."""
    problems = [phrase for field, phrase in layout_disagreements(config) if field == "dtype"]
    if problems:
        raise ValueError(f"{name}: {problems[0]}; remove one of them")
    value = config.get("dtype") if config.get("dtype") is not None else config.get("torch_dtype")
    return None if value is None else str(value).removeprefix("torch.")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
