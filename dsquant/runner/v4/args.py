"""V4Args: the runner's view of a DeepSeek-V4 config.json (V4-Flash, V4-Pro and their Base models).

Field names follow DeepSeek-V4 `inference/model.py` ModelArgs (`dim`, `window_size`, `compress_ratios`, ...).
Hugging Face keys are read through `_KEYS`; the per-layer schedule comes from the official `compress_ratios`
(0 sliding only, 4 CSA, 128 HCA; trailing MTP/DSpark sentinels dropped) or, in a config transformers wrote,
from `layer_types` + `compress_rates`; hash routing covers the first `num_hash_layers` layers (or the
`hash_moe` entries of `mlp_layer_types`). Both RoPE tables follow transformers' `DeepseekV4Config`: "main"
(rope_theta, no scaling) for sliding-only layers, "compress" (compress_rope_theta, YaRN from rope_scaling
with attention factor 1) for CSA/HCA layers and their compressors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = ("DeepseekV4ForCausalLM",)
# transformers' layer_types -> compression ratio (its default compress_rates; a config's own override them)
LAYER_TYPE_RATIOS = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}

# V4Args field -> (config.json key, default when the key is absent; None = required)
_KEYS = {
    "vocab_size": ("vocab_size", None),
    "dim": ("hidden_size", None),
    "moe_inter_dim": ("moe_intermediate_size", None),
    "n_layers": ("num_hidden_layers", None),
    "n_heads": ("num_attention_heads", None),
    "head_dim": ("head_dim", 512),
    "q_lora_rank": ("q_lora_rank", None),
    "o_groups": ("o_groups", 8),
    "o_lora_rank": ("o_lora_rank", 1024),
    "n_routed_experts": ("n_routed_experts", None),
    "n_shared_experts": ("n_shared_experts", 1),
    "n_activated_experts": ("num_experts_per_tok", None),
    "score_func": ("scoring_func", "sqrtsoftplus"),
    "route_scale": ("routed_scaling_factor", 1.0),
    "swiglu_limit": ("swiglu_limit", 0.0),
    "window_size": ("sliding_window", 128),
    "rope_theta": ("rope_theta", 10000.0),
    "compress_rope_theta": ("compress_rope_theta", 160000.0),
    "index_n_heads": ("index_n_heads", 64),
    "index_head_dim": ("index_head_dim", 128),
    "index_topk": ("index_topk", 512),
    "hc_mult": ("hc_mult", 4),
    "hc_sinkhorn_iters": ("hc_sinkhorn_iters", 20),
    "hc_eps": ("hc_eps", 1e-6),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "max_position_embeddings": ("max_position_embeddings", 1048576),
    "n_mtp_layers": ("num_nextn_predict_layers", 0),
    "tie_word_embeddings": ("tie_word_embeddings", False),
    "bos_token_id": ("bos_token_id", 0),
    "eos_token_id": ("eos_token_id", 1),
}
_OPTIONAL = ("bos_token_id", "eos_token_id")


@dataclass
class V4Args:
    """Architecture hyper-parameters (names after DeepSeek-V4 inference/model.py)."""

    vocab_size: int = 256
    dim: int = 64
    moe_inter_dim: int = 32
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    rope_head_dim: int = 8
    q_lora_rank: int = 32
    o_groups: int = 2
    o_lora_rank: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_hash_layers: int = 1
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    window_size: int = 8
    compress_ratios: tuple[int, ...] = (0, 4, 16, 4)
    csa_ratio: int = 4  # layers of this ratio are CSA (overlapping windows + indexer), other non-zero ones HCA
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = None
    index_n_heads: int = 4
    index_head_dim: int = 16
    index_topk: int = 4
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    n_mtp_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    extra: dict = field(default_factory=dict)
    # what dsquant.runner.routing.route reads: V4 has one expert group and always renormalises
    topk_method: str = "noaux_tc"
    n_expert_groups: int = 1
    norm_topk_prob: bool = True

    def is_moe_layer(self, layer: int) -> bool:
        return True  # every DeepSeek-V4 layer routes (hash or scores): there is no dense first layer

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def mtp_blocks(self) -> int:
        """MTP blocks the runner builds: the standard draft (`mtp.0`, one block); none for the DSpark draft of the
        0731 refresh (dspark_* keys), whose stages read other layers (main_proj) and which the runner does not run."""
        return 0 if any(k.startswith("dspark") for k in self.extra) else self.n_mtp_layers

    def compress_rope_scaling(self) -> dict | None:
        """rope_scaling for the "compress" table with YaRN's attention factor pinned to 1 (transformers forces
        `attention_factor=1.0`; the official model never scales cos/sin): mscale 0 makes rope_cache_ref's factor 1."""
        if not self.rope_scaling:
            return None
        return {**self.rope_scaling, "mscale": 0.0, "mscale_all_dim": 0.0}

    @classmethod
    def from_config(cls, config: dict, *, name: str = "config.json") -> V4Args:
        """Parse a DeepSeek-V4 config dict; ValueError names the file and the problem."""
        archs = config.get("architectures") or []
        if archs and not any(a in ARCHITECTURES for a in archs):
            raise ValueError(f"{name}: unsupported architecture {archs}; expected one of {ARCHITECTURES}")
        kwargs: dict = {}
        for attr, (key, default) in _KEYS.items():
            value = config.get(key, default)
            if value is None and attr not in _OPTIONAL:
                raise ValueError(f"{name}: missing required key {key!r}")
            kwargs[attr] = value
        n = kwargs["n_layers"]
        kwargs["compress_ratios"] = _compress_ratios(config, n, name)
        kwargs["n_hash_layers"] = _hash_layers(config, n)
        kwargs["csa_ratio"] = int((config.get("compress_rates") or {}).get("compressed_sparse_attention", 4))
        rope_dim = config.get("qk_rope_head_dim")
        if rope_dim is None:
            rope_dim = round(kwargs["head_dim"] * (config.get("partial_rotary_factor") or 64 / 512))
        kwargs["rope_head_dim"] = int(rope_dim)
        kwargs["rope_scaling"] = _yarn(config)
        if kwargs["score_func"] not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise ValueError(f"{name}: unsupported scoring_func {kwargs['score_func']!r}")
        known = {k for k, _ in _KEYS.values()}
        kwargs["extra"] = {k: v for k, v in config.items() if k not in known}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> V4Args:
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config ({e})") from None
        return cls.from_config(config, name=str(path))


def _compress_ratios(config: dict, n: int, name: str) -> tuple[int, ...]:
    ratios = config.get("compress_ratios")
    if ratios is None and config.get("layer_types") is not None:
        rates = {**LAYER_TYPE_RATIOS, **(config.get("compress_rates") or {}), "sliding_attention": 0}
        try:
            ratios = [rates[t] for t in config["layer_types"]]
        except KeyError as e:
            raise ValueError(f"{name}: unknown layer type {e} in layer_types") from None
    if ratios is None:
        raise ValueError(f"{name}: missing 'compress_ratios' (or 'layer_types'): the per-layer attention schedule")
    if len(ratios) < n:
        raise ValueError(f"{name}: compress_ratios has {len(ratios)} entries for {n} layers")
    return tuple(int(r) for r in ratios[:n])


def _hash_layers(config: dict, n: int) -> int:
    if config.get("num_hash_layers") is not None:
        return min(int(config["num_hash_layers"]), n)
    if config.get("mlp_layer_types") is not None:
        return sum(t == "hash_moe" for t in config["mlp_layer_types"][:n])
    return min(3, n)  # transformers' default schedule


def _yarn(config: dict) -> dict | None:
    rs = config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("compress") or {}
    kind = rs.get("type") or rs.get("rope_type")
    return dict(rs) if kind == "yarn" else None
