"""Fill a DeepSeek-V4 runner model from tensors under the official (unprefixed) checkpoint names.

Every runner module is named as the checkpoint names it (v4/model.py), so each module reads its own tensors
`<module>.<attr>`: linears read `<module>.weight` (+ `<module>.scale`) into a QuantizedWeight, every other
tensor fills the module's buffer of that name. Official linears:
    BF16/F32           weight as stored, no scale
    FP8                weight float8_e4m3fn [N, K] + scale [ceil(N/128), ceil(K/128)] (E8M0 instruct, F32 Base),
                       a multiplier: DeepSeek's `weight_scale_inv` under its V4 name (dsquant.formats.ondisk)
    FP4 (routed experts) weight int8 [N, K/2], E2M1 codes with element 2j in the low nibble (dsquant.formats.fp4's
                       packing) + scale float8_e8m0fnu [N, K/32]: MXFP4 (dsquant.formats.mxfp4)
    NVFP4 (experts of  ModelOpt's names (weight uint8, weight_scale, weight_scale_2, input_scale) beside the fp8
    the hybrid layout) quantization_config, read as ModelOpt NVFP4 (W4A4 with the stored input_scale)
Activations: `act` None keeps each format's scheme (FP8 linears quantize activations to FP8 1x128 groups, as
the official runtime and transformers' FP8Linear do on GPU; FP4 experts run weight-only, where the official
runtime feeds them FP8 activations too); act="none" multiplies unquantized activations by the dequantized
weights, which is what transformers computes when it dequantizes on load (CPU).
Tensors of modules the runner does not build (`mtp.*` unless asked for) are not read.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dsquant.formats.ondisk import read_quantized
from dsquant.formats.weight import QuantizedWeight
from dsquant.runner.linear import QuantLinear
from dsquant.runner.v4.model import Transformer


class _ScaleAsInv:
    """The tensors of one module with V4's `<m>.scale` seen as DeepSeek's `<m>.weight_scale_inv`."""

    def __init__(self, tensors, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def _name(self, name: str) -> str:
        return f"{self.prefix}.scale" if name == f"{self.prefix}.weight_scale_inv" else name

    def __contains__(self, name: str) -> bool:
        return self._name(name) in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self._name(name)]


def read_linear(tensors, prefix: str, quant_config: dict | None, act: str | None = None) -> QuantizedWeight:
    """The official tensors of linear `prefix` -> QuantizedWeight (ValueError names the module and the problem)."""
    w = tensors[f"{prefix}.weight"]
    if w.dtype in (torch.int8, torch.uint8) and f"{prefix}.scale" in tensors:  # packed FP4 experts
        scale = tensors[f"{prefix}.scale"]
        if tuple(scale.shape) != (w.shape[0], w.shape[1] * 2 // 32) or scale.element_size() != 1:
            raise ValueError(f"{prefix}: FP4 weight {tuple(w.shape)} needs an E8M0 scale of shape "
                             f"{(w.shape[0], w.shape[1] * 2 // 32)}, got {scale.dtype} {tuple(scale.shape)}")
        return QuantizedWeight("mxfp4", w.view(torch.uint8), scale.view(torch.uint8), act=act)
    if f"{prefix}.weight_scale_2" in tensors:  # NVIDIA's hybrid: ModelOpt NVFP4 experts in an fp8 checkpoint
        qw = read_quantized(prefix, tensors, {"quant_method": "modelopt"})
        return replace(qw, act=act)
    qw = read_quantized(prefix, _ScaleAsInv(tensors, prefix), quant_config or {"quant_method": "fp8"})
    if qw.format.block_grid:
        if tuple(qw.scale.shape) != qw.format.scale_shape(qw.shape):
            raise ValueError(f"{prefix}: scale shape {tuple(qw.scale.shape)} is not the 128x128 grid of {qw.shape}")
        return replace(qw, act=act)
    return qw


def load_tensors(model: Transformer, tensors, quant_config: dict | None = None, device="cpu",
                 act: str | None = None, part: str = "") -> int:
    """Fill the linears and buffers of the model (part "": all of it; "layers.N": one decoder layer; "mtp.N": one
    MTP block, when built; "non-layer": all but the decoder layers and MTP blocks) from `tensors` (anything with
    `in` and `[]` by official name, read lazily); returns the bytes placed. ValueError names the first tensor
    needed and missing."""
    nbytes = 0
    modules = model.get_submodule(part).named_modules(prefix=part) if part.startswith(("layers.", "mtp.")) else (
        (n, m) for n, m in model.named_modules() if part != "non-layer" or not n.startswith(("layers.", "mtp.")))
    for name, mod in modules:
        prefix = f"{name}." if name else ""
        if isinstance(mod, QuantLinear):
            if f"{prefix}weight" not in tensors:
                raise ValueError(f"missing tensor {prefix}weight")
            w = read_linear(tensors, name, quant_config, act)
            w = w.apply(lambda t: t.to(device))
            mod.set_weight(w, name=name)
            nbytes += w.nbytes
            continue
        for attr in mod._buffers:
            if f"{prefix}{attr}" not in tensors:
                raise ValueError(f"missing tensor {prefix}{attr}")
            t = mod._buffers[attr] = tensors[f"{prefix}{attr}"].to(device)
            nbytes += t.numel() * t.element_size()
    return nbytes


def load_v4_model(reader, *, impl: str = "reference", device="cpu", dtype: torch.dtype = torch.float32,
                  layers: bool = True, mtp: bool = False) -> Transformer:
    """The runner's V4 model filled from a ModelCheckpoint (runner/load.py; its args are V4Args); layers=False: only the
    non-layer tensors (embed, norm, head, hyper-head), for streaming; mtp: with the MTP block (V4Args.mtp_blocks),
    filled with the layers. Errors name the checkpoint."""
    model = Transformer(reader.args, impl=impl, dtype=dtype, mtp=mtp).eval()
    load_v4_part(model, reader, "" if layers else "non-layer", device)
    return model


def load_v4_part(model: Transformer, reader, part: str, device) -> int:
    """load_tensors from a ModelCheckpoint (or what reads like one: `in`, `[]`, quant_config, path), errors
    prefixed with the checkpoint path; returns the bytes."""
    try:
        return load_tensors(model, reader, reader.quant_config, device, part=part)
    except ValueError as e:
        raise ValueError(f"{reader.path}: {e}") from None
