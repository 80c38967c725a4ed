"""Layer-streamed execution: every window passes one decoder layer at a time, one layer resident.

The embedding, final norm and lm_head stay loaded; decoder layer i is read from the checkpoint, run
over the hidden states of all windows, and dropped before layer i + 1 is read. Resident weights are
therefore the non-layer tensors plus one layer, whatever the depth: a 671B checkpoint (about 11 GB of
FP8 per MoE layer) is evaluated on one 80 GB GPU or on CPU. The hidden states of all windows
([W, S, D] in the activation dtype: 29 MB per 2048-token window on V3) stay on the device.

`StreamStats` records, per layer, the bytes read, the seconds spent reading them and the seconds of
compute, and the peak of resident weight bytes measured from the live tensors themselves (weak
references), which is what tests/runner/test_offload.py bounds.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from dsquant.runner.cache import PagedLatentCache
from dsquant.runner.linear import QuantLinear
from dsquant.runner.load import load_layer, load_model, unload_layer
from dsquant.runner.model import Transformer, Weighted

log = logging.getLogger(__name__)


@dataclass
class StreamStats:
    layers: list[dict] = field(default_factory=list)  # {"layer", "bytes", "load_s", "compute_s"}
    peak_resident_bytes: int = 0
    non_layer_bytes: int = 0

    def as_dict(self) -> dict:
        return {"layers": self.layers, "peak_resident_bytes": self.peak_resident_bytes,
                "non_layer_bytes": self.non_layer_bytes}  # fmt: skip


def _weight_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for mod in module.modules():
        if isinstance(mod, QuantLinear) and mod.w is not None:
            out += [t for t in (mod.w.q, mod.w.scale, mod.w.global_scale, mod.w.input_scale) if t is not None]
        elif isinstance(mod, Weighted):
            out += [t for t in mod._buffers.values() if t is not None]
    return out


class _Resident:
    """Weak references to every weight tensor ever loaded: the live ones are what is resident."""

    def __init__(self):
        self.refs: dict[int, weakref.ref] = {}
        self.peak = 0

    def track(self, module: torch.nn.Module) -> None:
        for t in _weight_tensors(module):
            self.refs.setdefault(id(t), weakref.ref(t))
        self.peak = max(self.peak, self.bytes())

    def bytes(self) -> int:
        alive = [r() for r in self.refs.values()]
        return sum(t.numel() * t.element_size() for t in alive if t is not None)


def stream_logits(
    path, windows: torch.Tensor, *, impl: str = "reference", device: str = "cpu", kv_cache: str = "bf16",
    batch_size: int = 8, stats: StreamStats | None = None, on_layer=None,
):  # fmt: skip
    """Yield (first window index, logits float32 [b, S, V]) per batch, after streaming all layers.

    on_layer(layer index, block) is called once each layer is loaded, before it runs (calibration
    registers its hooks there)."""
    stats = stats if stats is not None else StreamStats()
    model, reader = load_model(path, impl=impl, device=device, layers=False)
    resident = _Resident()
    resident.track(model)
    stats.non_layer_bytes = resident.bytes()
    a = model.args
    s = windows.shape[1]
    rope = model.rope(s, torch.device(device))
    hidden = [model.embed(windows[i : i + batch_size].to(device)) for i in range(0, len(windows), batch_size)]
    for layer in range(a.n_layers):
        t0 = time.perf_counter()
        nbytes = load_layer(model, reader, layer, device)
        _sync(device)
        t1 = time.perf_counter()
        resident.track(model)
        block = model.model.layers[layer]
        if on_layer is not None:
            on_layer(layer, block)
        with torch.no_grad():
            for j, h in enumerate(hidden):
                cache = PagedLatentCache(1, h.shape[0], s, a.kv_lora_rank, a.qk_rope_head_dim, kv_dtype=kv_cache,
                                         device=device, impl=impl)  # fmt: skip
                hidden[j] = block(h, 0, rope, cache[0])
        _sync(device)
        stats.layers.append({"layer": layer, "bytes": nbytes, "load_s": t1 - t0, "compute_s": time.perf_counter() - t1})
        unload_layer(model, layer)
        del block
    stats.peak_resident_bytes = resident.peak
    with torch.no_grad():
        for j, h in enumerate(hidden):
            yield j * batch_size, model.head(h)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def resident_logits(
    model: Transformer, windows: torch.Tensor, *, kv_cache: str = "bf16", batch_size: int = 8, device: str = "cpu"
):
    """Yield (first window index, logits) per batch with the whole model resident."""
    a = model.args
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            x = windows[i : i + batch_size].to(device)
            cache = PagedLatentCache(a.n_layers, x.shape[0], x.shape[1], a.kv_lora_rank, a.qk_rope_head_dim,
                                     kv_dtype=kv_cache, device=device, impl=model.impl)  # fmt: skip
            yield i, model(x, 0, cache)
