"""Fill a DeepSeek-V4 runner model from tensors under the official (unprefixed) checkpoint names.

Every runner module is named as the checkpoint names it (v4/model.py), so each module reads its own tensors
`<module>.<attr>`: linears read `<module>.weight` (+ `<module>.scale`) into a LinearWeight, every other
tensor fills the module's buffer of that name. Official linears:
    BF16/F32           weight as stored, no scale
    FP8                weight float8_e4m3fn [N, K] + scale [ceil(N/128), ceil(K/128)] (E8M0 instruct, F32 Base),
                       a multiplier: DeepSeek's `weight_scale_inv` under its V4 name (dsquant.formats.ondisk)
Tensors of modules the runner does not build (`mtp.*`) are not read.
"""

from __future__ import annotations

import torch

from dsquant.formats.ondisk import read_quantized
from dsquant.runner.linear import LinearWeight, QuantLinear
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


def read_linear(tensors, prefix: str, quant_config: dict | None) -> LinearWeight:
    """The official tensors of linear `prefix` -> LinearWeight (ValueError names the module and the problem)."""
    qw = read_quantized(prefix, _ScaleAsInv(tensors, prefix), quant_config or {"quant_method": "fp8"})
    if qw.fmt == "fp8-block":
        n, k = qw.q.shape
        if tuple(qw.scale.shape) != (-(-n // 128), -(-k // 128)):
            raise ValueError(f"{prefix}: scale shape {tuple(qw.scale.shape)} is not the 128x128 grid of {(n, k)}")
        return LinearWeight("fp8_block", qw.q, qw.scale)
    return LinearWeight(qw.fmt, qw.q)


def load_tensors(model: Transformer, tensors, quant_config: dict | None = None, device="cpu") -> None:
    """Fill every linear and buffer of the model from `tensors` (anything with `in` and `[]` by official name,
    read lazily); ValueError names the first tensor the model needs and `tensors` lacks."""
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, QuantLinear):
            if f"{prefix}weight" not in tensors:
                raise ValueError(f"missing tensor {prefix}weight")
            w = read_linear(tensors, name, quant_config)
            scale = None if w.scale is None else w.scale.to(device)
            mod.set_weight(LinearWeight(w.fmt, w.q.to(device), scale), name=name)
            continue
        for attr in mod._buffers:
            if f"{prefix}{attr}" not in tensors:
                raise ValueError(f"missing tensor {prefix}{attr}")
            mod._buffers[attr] = tensors[f"{prefix}{attr}"].to(device)
