"""Layer-streamed execution: every window passes one decoder layer at a time, one layer resident.

The embedding, final norm and lm_head stay loaded; decoder layer i is read from the checkpoint, run
over the hidden states of all windows, and dropped before layer i + 1 is read. Resident weights are
therefore the non-layer tensors plus one layer, whatever the depth: a 671B checkpoint (about 11 GB of
FP8 per MoE layer) is evaluated on one 80 GB GPU or on CPU. The hidden states of all windows
([W, S, D] in the activation dtype: 29 MB per 2048-token window on V3; V4 keeps hc_mult streams
[W, S, n, D]) stay on the device. Either family (dsquant.runner.family) streams the same way.

`StreamStats` records, per layer, the bytes read, the seconds spent reading them and the seconds of
compute, and the peak of resident weight bytes measured from the live tensors themselves (weak
references), which is what tests/runner/test_offload.py bounds.

With several devices (`--device cuda` on a machine with more than one GPU) the windows are split
between them and every device streams the same layers over its own windows: each layer is read once, on
the host, and copied to every device; the compute divides by the device count, and the result equals the
single-device result batch for batch.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dsquant.devices import current_device
from dsquant.runner.family import decoder_layers, embed, logits, mtp_or_layer, new_cache, run_layer
from dsquant.runner.linear import QuantLinear
from dsquant.runner.load import load_layer, load_model, unload_layer
from dsquant.runner.model import Transformer

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
        else:  # every buffer holds a weight (norms, router, hyper-connection parameters)
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
    batch_size: int = 8, stats: StreamStats | None = None, on_layer=None, devices: list[str] | None = None,
    progress=None, mtp: bool = False,
):  # fmt: skip
    """Yield (first window index, logits float32 [b, S, V]) per batch, after streaming all layers.

    devices: several devices (e.g. every visible GPU) share the windows: batch j lives on devices[j % n],
    and each device loads the current layer and runs its own batches, in one thread per device. A batch
    is computed exactly as on one device (same batch composition, same kernels), so the logits are the
    single-device logits. Each device holds the non-layer weights and one layer.

    on_layer(layer index, block) is called once each layer is loaded, before it runs (calibration
    registers its hooks there); with several devices it is called once per device's copy of the layer,
    from that device's thread. progress (a dsquant.progress.Progress) counts each layer as its share of the
    windows' tokens. mtp (DeepSeek-V4): then stream its MTP block too, as layer n_layers (calibration sees its
    inputs; the logits stay the backbone's)."""
    stats = stats if stats is not None else StreamStats()
    devs = [str(d) for d in devices] if devices else [str(device)]
    parts = [_DevicePart(path, d, impl, mtp) for d in devs]
    stats.non_layer_bytes = parts[0].resident.bytes()
    a = parts[0].model.args
    for j, i in enumerate(range(0, len(windows), batch_size)):
        part = parts[j % len(parts)]
        with current_device(part.device):
            tokens = windows[i : i + batch_size].to(part.device)
            part.hidden.append((j, embed(part.model, tokens), tokens))
    with ThreadPoolExecutor(len(parts)) as pool:  # one thread per device
        for layer in range(a.n_layers):
            shared, read_s = _read_layer(parts[0].reader, layer) if len(parts) > 1 else (None, 0.0)
            runs = [pool.submit(part.run_layer, layer, kv_cache, on_layer, shared) for part in parts]
            timings = [r.result() for r in runs]  # re-raises a device's error here
            del shared
            stats.layers.append({"layer": layer, "bytes": timings[0][0],
                                 "load_s": read_s + max(t[1] for t in timings),
                                 "compute_s": max(t[2] for t in timings)})  # fmt: skip
            if progress is not None:
                progress.update(windows.numel() / a.n_layers)
        for block in range(len(getattr(parts[0].model, "mtp", ()))):
            for r in [pool.submit(part.run_mtp, a.n_layers + block, on_layer) for part in parts]:
                r.result()
    stats.peak_resident_bytes = max(part.resident.peak for part in parts)
    heads = sorted(((j, h, part) for part in parts for j, h, _ in part.hidden), key=lambda x: x[0])
    for j, h, part in heads:
        # no_grad only around the computation: held across a yield it would leak into the caller, and two
        # interleaved generators closing in the wrong order would leave gradients off for the whole process
        with current_device(part.device), torch.no_grad():  # the head's kernels launch on the device holding h
            out = logits(part.model, h)
        yield j * batch_size, out


class _DevicePart:
    """One device's share of a streamed pass: its model skeleton, reader and the hidden states of its batches."""

    def __init__(self, path, device: str, impl: str, mtp: bool = False):
        self.device = device
        self.model, self.reader = load_model(path, impl=impl, device=device, layers=False, mtp=mtp)
        self.resident = _Resident()
        self.resident.track(self.model)
        self.hidden: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (batch index, [b, S, (n,) D], tokens)

    def run_layer(self, layer: int, kv_cache: str, on_layer, shared: dict | None = None):
        """Load layer `layer` (from `shared`, its tensors already read on the host, when given), pass this
        device's batches through it, drop it: (bytes, load s, compute s)."""
        with current_device(self.device):
            model = self.model
            t0 = time.perf_counter()
            reader = self.reader if shared is None else _Preloaded(self.reader, shared)
            nbytes = load_layer(model, reader, layer, self.device)
            _sync(self.device)
            t1 = time.perf_counter()
            self.resident.track(model)
            if on_layer is not None:
                on_layer(layer, decoder_layers(model)[layer])
            with torch.no_grad():
                for k, (j, h, tokens) in enumerate(self.hidden):
                    self.hidden[k] = (j, run_layer(model, layer, h, tokens, kv_cache), tokens)
            _sync(self.device)
            t2 = time.perf_counter()
            unload_layer(model, layer)
            return nbytes, t1 - t0, t2 - t1


    def run_mtp(self, layer: int, on_layer) -> None:
        """DeepSeek-V4's MTP block `layer` - n_layers over this device's batches: position t takes the backbone's
        last streams at t and token t + 1; its output is dropped (the hidden states stay the backbone's)."""
        with current_device(self.device):
            model = self.model
            load_layer(model, self.reader, layer, self.device)
            block = mtp_or_layer(model, layer)
            if on_layer is not None:
                on_layer(layer, block)
            with torch.no_grad():
                for _, h, tokens in self.hidden:
                    nxt = tokens[:, 1:]
                    block.draft(h[:, :-1], model.embed(nxt, model.dtype), model.ropes(nxt.shape[1], h.device), nxt)
            unload_layer(model, layer)


def _read_layer(reader, layer: int) -> tuple[dict[str, torch.Tensor], float]:
    """Every tensor of one decoder layer, read once on the host for all devices: (tensors, seconds)."""
    t0 = time.perf_counter()
    return {k: reader.get(k) for k in reader.layer_keys(layer)}, time.perf_counter() - t0


class _Preloaded:
    """A ModelCheckpoint whose get() serves the tensors already read (the other attributes are the reader's)."""

    def __init__(self, reader, tensors: dict[str, torch.Tensor]):
        self._reader, self._tensors = reader, tensors

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        return t if t is not None else self._reader.get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def __getattr__(self, attr: str):
        return getattr(self._reader, attr)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def resident_logits(
    model: Transformer, windows: torch.Tensor, *, kv_cache: str = "bf16", batch_size: int = 8, device: str = "cpu"
):
    """Yield (first window index, logits) per batch with the whole model resident."""
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)
        with torch.no_grad():  # not across the yield (stream_logits says why)
            out = model(x, 0, new_cache(model, x.shape[0], x.shape[1], kv_cache, device))
        yield i, out
