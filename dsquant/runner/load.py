"""Load a DeepSeek-family checkpoint into the runner, keeping every linear in its stored format.

Reads only safetensors (sharded with model.safetensors.index.json, or one model.safetensors). Each
linear's tensors are normalised to a QuantizedWeight (scales that multiply) by dsquant.formats.ondisk,
from the names each convention writes:
    DeepSeek FP8          weight f8e4m3 [N, K] + weight_scale_inv f32 [N/128, K/128]
    compressed-tensors    FP8 block: weight f8e4m3 + weight_scale [N/128, K/128];
                          FP8 channel / tensor: weight f8e4m3 + weight_scale [N, 1] or [1] (+ input_scale);
                          INT8: weight int8 + weight_scale [N, 1];
                          NVFP4: weight_packed + weight_scale e4m3 + weight_global_scale (a divisor)
                                 + input_global_scale (a divisor);
                          MXFP4: weight_packed + weight_scale uint8 (E8M0)
    ModelOpt NVFP4        weight uint8 [N, K/2] + weight_scale e4m3 + weight_scale_2 + input_scale
    anything else         BF16/FP16/FP32 weight as stored
A per-layer FP8 KV-cache scale, when a checkpoint carries one, is read under any of the names checkpoints
give it (`KV_SCALE_NAMES`; MLA caches one latent row, so only k_scale matters) and used by the runner's FP8
latent cache for that layer (`--kv-cache fp8`); without one the cache uses 1.0. The runner then measures
the cache the checkpoint declares: vLLM and SGLang currently run DeepSeek MLA's FP8 cache at 1.0 whatever
is stored (dsquant.runner.calibrate says why).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import torch

from dsquant.checkpoint.names import layer_index, layer_prefix
from dsquant.checkpoint.reader import Checkpoint
from dsquant.formats.ondisk import read_quantized
from dsquant.formats.registry import convention_of
from dsquant.formats.weight import QuantizedWeight
from dsquant.runner.family import V4, family_of, model_args, mtp_or_layer
from dsquant.runner.linear import QuantLinear
from dsquant.runner.model import MLA, Transformer, Weighted
from dsquant.runner.schemes import activation_scheme
from dsquant.runner.v4.load import load_v4_model, load_v4_part

log = logging.getLogger(__name__)

_LINEAR_SUFFIXES = (
    "weight", "weight_scale_inv", "weight_scale", "weight_scale_2", "weight_packed",
    "weight_global_scale", "input_scale", "input_global_scale",
)  # fmt: skip
# FP8 KV-cache scale names of a DeepSeek layer: compressed-tensors / HF `self_attn.k_scale`, ModelOpt
# `self_attn.k_proj.k_scale`, and `self_attn.kv_a_proj_with_mqa.k_scale` (SGLang's loader accepts the latter
# two for MLA). The runner attaches the value to the layer's MLA module.
KV_SCALE_NAMES = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(?:k_proj\.|kv_a_proj_with_mqa\.)?k_scale$")


class ModelCheckpoint(Checkpoint):
    """A checkpoint opened for the runner: its model family and arguments from config.json, tensors placed for
    the kernels, and each decoder layer's tensors by name."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.family = family_of(self.config)
        self.args = model_args(self.config, name=str(self.path / "config.json"))

    def get(self, name: str) -> torch.Tensor:
        t = super().get(name)
        # a CPU tensor may alias the file mapping at any byte offset; kernels (TMA descriptors) need 16
        return t.clone() if t.data_ptr() % 16 else t

    def layer_keys(self, layer: int) -> list[str]:
        prefix = f"{layer_prefix(self.family, layer)}."
        return [k for k in self.weight_map if k.startswith(prefix)]

    def layer_nbytes(self, layer: int) -> int:
        """Bytes of one decoder layer on disk (from the safetensors headers, no data read)."""
        return sum(self.infos[k].nbytes for k in self.layer_keys(layer))


def read_linear(reader: ModelCheckpoint, prefix: str, device: torch.device | str = "cpu") -> QuantizedWeight:
    """The tensors `<prefix>.*` of one linear -> QuantizedWeight on device (ValueError names what is wrong).

    Names and scale directions per convention come from dsquant.formats.ondisk, the one place that knows them;
    a compressed-tensors module's activation scheme is its own config group's (dsquant.runner.schemes).
    """
    t = {f"{prefix}.{s}": reader.get(f"{prefix}.{s}").to(device)
         for s in _LINEAR_SUFFIXES if f"{prefix}.{s}" in reader}  # fmt: skip
    try:
        qw = read_quantized(prefix, t, reader.quant_config)
    except ValueError as e:
        raise ValueError(f"{reader.path}: {e}") from None
    fmt = qw.format
    if fmt.block_grid and tuple(qw.scale.shape) != fmt.scale_shape(qw.shape):
        raise ValueError(f"{reader.path}: {prefix} scale shape {tuple(qw.scale.shape)}, expected "
                         f"{fmt.scale_shape(qw.shape)}")
    act = None
    if fmt.quantized and convention_of(reader.quant_config) == "compressed-tensors":
        try:
            act = activation_scheme(reader.quant_config, prefix, qw.fmt)
        except ValueError as e:
            raise ValueError(f"{reader.path}: {e}") from None
    scale = qw.scale.reshape(-1, 1) if fmt.per_channel else qw.scale
    return replace(qw, scale=scale, act=act)


def _assign(model: Transformer, reader: ModelCheckpoint, names: list[str], device) -> int:
    """Load the named tensors into their modules; returns the number of bytes placed."""
    done, nbytes = set(), 0
    for name in names:
        if m := KV_SCALE_NAMES.match(name):
            _assign_kv_scale(model, reader, name, m.group(1), device)
            continue
        mod_name, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            log.debug("skipping %s: no such module in the runner", name)
            continue
        if isinstance(mod, QuantLinear):
            if mod_name in done:
                continue
            done.add(mod_name)
            w = read_linear(reader, mod_name, device)
            mod.set_weight(w, name=f"{reader.path}: {mod_name}")
            nbytes += w.nbytes
        elif isinstance(mod, Weighted) and hasattr(mod, attr):
            t = reader.get(name).to(device)
            setattr(mod, attr, t)
            nbytes += t.numel() * t.element_size()
    return nbytes


def _assign_kv_scale(model: Transformer, reader: ModelCheckpoint, name: str, attn: str, device) -> None:
    try:
        mod = model.get_submodule(attn)
    except AttributeError:
        log.debug("skipping %s: no such layer in the runner", name)
        return
    t = reader.get(name)
    if t.numel() != 1 or not t.is_floating_point() or not (0 < float(t.float().reshape(())) < float("inf")):
        raise ValueError(f"{reader.path}: {name} must be one positive finite float (the layer's FP8 KV-cache "
                         f"scale), got {t.dtype} {tuple(t.shape)}")
    if isinstance(mod, MLA):
        mod.k_scale = t.float().reshape(()).to(device)


def check_complete(module: torch.nn.Module, what: str) -> None:
    """ValueError naming the first weight the checkpoint did not provide."""
    for name, mod in module.named_modules():
        missing = (isinstance(mod, QuantLinear) and mod.w is None and mod.weight is None) or (
            isinstance(mod, Weighted) and mod.weight is None
        )
        if missing:
            raise ValueError(f"{what}: missing tensor for {name}")


def load_model(
    path: str | Path, *, impl: str = "reference", device: str = "cpu", dtype: torch.dtype | None = None,
    mtp: bool = False, layers: bool = True,
) -> tuple[Transformer, ModelCheckpoint]:
    """Build the runner model and fill it from a checkpoint (layers=False: only embed/norm/head, for streaming)."""
    reader = ModelCheckpoint(path)
    args = reader.args
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if reader.family == V4:
        return load_v4_model(reader, impl=impl, device=device, dtype=dtype, layers=layers, mtp=mtp), reader
    model = Transformer(args, impl=impl, dtype=dtype, mtp=mtp).eval()
    names = [k for k in reader.keys() if layer_index(k) is None]
    if layers:
        n = args.n_layers + (args.n_mtp_layers if mtp else 0)
        names += [k for k in reader.keys() if (li := layer_index(k)) is not None and li < n]
    _assign(model, reader, names, device)
    if model.lm_head.w is None and args.tie_word_embeddings:
        model.lm_head.set_weight(QuantizedWeight("bf16", model.model.embed_tokens.weight))
    check_complete(model if layers else _non_layer_view(model), str(reader.path))
    return model, reader


def _non_layer_view(model: Transformer) -> torch.nn.Module:
    return torch.nn.ModuleDict({"embed": model.model.embed_tokens, "norm": model.model.norm, "lm_head": model.lm_head})


def load_layer(model: Transformer, reader: ModelCheckpoint, layer: int, device) -> int:
    """Fill decoder layer `layer` from the checkpoint; returns its bytes. On DeepSeek-V4 the MTP block built
    (model.mtp) counts as layer n_layers."""
    if reader.family == V4:
        n = reader.args.n_layers
        return load_v4_part(model, reader, f"layers.{layer}" if layer < n else f"mtp.{layer - n}", device)
    nbytes = _assign(model, reader, reader.layer_keys(layer), device)
    check_complete(model.model.layers[layer], f"{reader.path}: layer {layer}")
    return nbytes


def unload_layer(model: Transformer, layer: int) -> None:
    """Drop the layer's weights so only one layer stays resident while streaming."""
    for mod in mtp_or_layer(model, layer).modules():
        if hasattr(mod, "_stack"):  # MoE: the experts stacked for the fused kernel are a copy
            mod._stack = None
        if isinstance(mod, QuantLinear):
            mod.w, mod.weight = None, None
        for name in list(mod._buffers):  # every buffer of a layer is a weight (norms, router, k_scale, hc_*)
            mod._buffers[name] = None
