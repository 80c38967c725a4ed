"""Activation calibration through the layer-streamed pass: NVFP4 input global scales and FP8 KV-cache scales.

One pass of the source model over the calibration windows (dsquant.runner.offload.stream_logits, one
decoder layer resident at a time). While a layer is resident, forward pre-hooks feed every linear's
input rows to a bounded RowSample (calib_search.py: at most `sample_rows` rows per linear, plus the
amax over all rows) and record the amax of the latent rows the MLA cache stores. When the next layer
loads, the layer's scales are chosen (calib_search.search_input_scale, method "mse" by default or
"amax") and its samples are dropped, so sample memory is one layer's worth:
sample_rows * (sum of the distinct input widths of the layer's linears) * activation itemsize
(V3 MoE layer, 256 rows, BF16: 256 experts * (7168 + 2048) * 256 * 2 B = 1.2 GB on the device).
DeepSeek-V4 streams the same way (its layers carry the hc_mult streams between them); scales are keyed by the
official module names (`layers.L.ffn.experts.E.w1`), which its converter looks up, and it has no latent cache.
Its MTP block (`mtp.0`) streams after the last layer (runner/offload.py), fed the backbone's last streams and the
next tokens, so its experts get scales of their own (counted as layer n_layers); the DSpark draft of the 0731
refresh is not run, and its experts keep the recipe default.

Fused partners read the same input and share one value: up_proj takes gate_proj's, kv_a_proj_with_mqa
takes q_a_proj's, DeepSeek-V4's w3 takes w1's (only the first of each pair is sampled). Experts that
receive no calibration token (routing is sparse) take the largest scale chosen for the same projection
(gate/up/down) among the layer's other experts, the most headroom any of them needed (for method "amax"
this is the layer's max amax / 2688); if no expert of the layer saw a token, the converter's recipe default stays.

FP8 KV cache: per layer, kv_amax = max |x| over the latent rows as the cache stores them (normed kv_c
and the roped k_pe, one 576-wide row on V3), and k_scale = max(kv_amax / 448, 1.0), ModelOpt's export
rule. The clamp keeps the uncalibrated cache's range (1.0 holds |x| <= 448) and only ever widens it. A
scale below 1 would lift values under E4M3's smallest normal (2^-6), but as it is no power of two it
also re-draws the rounding of every other value; on the demo amax / 448 (0.017-0.038) changed KLD by
+1 % (FP8 source) and -2 % (nvfp4) and top-1 by +0.07 / -0.30 points against 1.0: noise, no gain
(benchmarks/results/runner_demo_calibration.csv).

The converter does not write KV scales: no engine applies a stored MLA cache scale for a DeepSeek
checkpoint. vLLM holds the MLA scale at `self_attn.mla_attn.mla_attn.k_scale` and remaps checkpoint names
`self_attn.k_scale` and `self_attn.k_proj.k_scale` to `self_attn.attn.k_scale`, which MLA layers do not
have (it warns "not loaded" and runs with 1.0); SGLang loads ModelOpt's `self_attn.k_proj.k_scale` into
its `attn_mqa.k_scale`, but the MLA KV pool of the versions read casts to FP8 without it (a newer fused
FP8-quantizing store exists whose use of it is unconfirmed); ModelOpt's DeepSeek export writes none and
declares `kv_cache_quant_algo: FP8`, which TRT-LLM runs at 1.0. Stored scales would change nothing that
serves the checkpoint, and are 1.0 on the demo after the clamp anyway. Where a checkpoint does carry a
layer k_scale, the runner's FP8 cache uses it (load.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from dsquant.checkpoint.names import layer_prefix
from dsquant.devices import cpu_threads
from dsquant.formats.fp8 import FP8_E4M3_MAX
from dsquant.progress import Progress
from dsquant.runner.calib_search import DEFAULT_SAMPLE_ROWS, METHODS, TOLERANCE, RowSample, search_input_scale
from dsquant.runner.family import V3, require
from dsquant.runner.linear import QuantLinear
from dsquant.runner.load import ModelCheckpoint
from dsquant.runner.offload import stream_logits
from dsquant.runner.perplexity import make_windows
from dsquant.runner.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
# a routed expert's linear, V3 (model.layers.L.mlp.experts.E.gate_proj) or V4 (layers.L.ffn.experts.E.w1, and
# mtp.M.ffn.experts.E.w1 in its MTP block): groups (experts prefix, "mtp" or not, layer, expert, projection)
_EXPERT = re.compile(r"^((?:model\.)?(layers|mtp)\.(\d+)\.(?:mlp|ffn)\.experts)\.(\d+)\.(\w+)$")
# follower -> leader: linears fed the same tensor, sampled once, one shared scale
PARTNERS = {"up_proj": "gate_proj", "kv_a_proj_with_mqa": "q_a_proj", "w3": "w1"}


@dataclass
class Calibration:
    """What one calibration pass found. input_scales: {module: NVFP4 activation global scale};
    kv_amax: {layer: max |latent cache row|}; peak_sample_bytes: the largest one-layer sample set."""

    input_scales: dict[str, float]
    kv_amax: dict[int, float]
    method: str
    sample_rows: int
    peak_sample_bytes: int = 0
    errors: dict[str, dict[float, float]] = field(default_factory=dict)
    idle_experts: dict[int, int] = field(default_factory=dict)  # {MoE layer: experts no token reached}
    n_routed_experts: int = 0

    def kv_scales(self, clamp: bool = True) -> dict[int, float]:
        """{layer: FP8 KV-cache scale}: kv_amax / 448, at least 1.0 with clamp (ModelOpt's rule)."""
        out = {}
        for layer, amax in self.kv_amax.items():
            s = float(torch.tensor(amax, dtype=torch.float32) / FP8_E4M3_MAX) if amax > 0 else 1.0
            out[layer] = max(s, 1.0) if clamp else s
        return out

    def saturating_layers(self) -> dict[int, float]:
        """{layer: kv_amax} where the latent exceeds 448: an FP8 cache at scale 1.0, what the engines run for
        DeepSeek MLA, saturates there."""
        return {layer: a for layer, a in sorted(self.kv_amax.items()) if a > FP8_E4M3_MAX}


def record(
    ckpt, windows: torch.Tensor, *, method: str = "mse", device: str = "cpu", batch_size: int = 8,
    sample_rows: int = DEFAULT_SAMPLE_ROWS, tol: float = TOLERANCE, grid: str = "pow2", progress=None,
) -> Calibration:  # fmt: skip
    """Stream `windows` [W, S] through the checkpoint and choose every linear's input scale (before the
    idle-expert fallback and partner sharing, which `finish` applies). progress: a dsquant.progress.Progress."""
    if method not in METHODS:
        raise ValueError(f"--calib-method {method!r}: choose one of {METHODS}")
    reader = ModelCheckpoint(ckpt)
    require(reader.family, "calibrate", str(reader.path))
    cap = sample_rows if method == "mse" else 1  # the amax rule needs no rows
    cal = Calibration({}, {}, method, sample_rows)
    samples: dict[str, RowSample] = {}

    def settle() -> None:  # choose the resident layer's scales, then drop its samples
        cal.peak_sample_bytes = max(cal.peak_sample_bytes, sum(s.nbytes for s in samples.values()))
        for name, s in samples.items():
            if s.seen:
                cal.input_scales[name], cal.errors[name] = search_input_scale(
                    s.sample(), s.amax, method=method, tol=tol, grid=grid)  # fmt: skip
        samples.clear()

    n_layers = reader.args.n_layers

    def on_layer(layer: int, block: torch.nn.Module) -> None:
        settle()
        prefix = layer_prefix(reader.family, layer) if layer < n_layers else f"mtp.{layer - n_layers}"  # V4's MTP
        for name, mod in block.named_modules():
            if isinstance(mod, QuantLinear) and name.rpartition(".")[2] not in PARTNERS:
                full = f"{prefix}.{name}"
                samples[full] = RowSample(cap, seed=layer)
                mod.register_forward_pre_hook(lambda m, args, s=samples[full]: s.add(args[0]))
        if reader.family == V3:  # the MLA latent cache; V4 stores none
            block.self_attn.register_forward_pre_hook(
                lambda m, args, layer=layer: _watch_cache(cal.kv_amax, layer, args))

    impl = "triton" if str(device).startswith("cuda") else "reference"
    for _ in stream_logits(ckpt, windows, impl=impl, device=device, batch_size=batch_size, on_layer=on_layer,
                           progress=progress, mtp=reader.family != V3):  # fmt: skip
        pass
    settle()
    return cal


def _watch_cache(kv_amax: dict[int, float], layer: int, args: tuple) -> None:
    """MLA pre-hook: wrap this call's LayerCache.store to record the amax of the rows it stores."""
    cache = args[3] if len(args) > 3 else None
    if cache is None or getattr(cache, "_calibration_watch", False):
        return
    store = cache.store

    def watched(kv_c: torch.Tensor, k_pe: torch.Tensor, start_pos: int) -> None:
        amax = max(float(kv_c.detach().abs().amax()), float(k_pe.detach().abs().amax()))
        kv_amax[layer] = max(kv_amax.get(layer, 0.0), amax)
        store(kv_c, k_pe, start_pos)

    cache.store, cache._calibration_watch = watched, True


def finish(ckpt, cal: Calibration) -> Calibration:
    """Apply the idle-expert fallback and share scales between fused partners (in place; returns cal)."""
    args = ModelCheckpoint(ckpt).args
    n_experts = args.n_routed_experts
    per_proj: dict[tuple[str, str], float] = {}
    seen: dict[int, set[int]] = {layer: set() for layer in range(args.n_layers) if args.is_moe_layer(layer)}
    for name, v in cal.input_scales.items():
        if m := _EXPERT.match(name):
            key = (m.group(1), m.group(5))
            per_proj[key] = max(per_proj.get(key, 0.0), v)
            layer = int(m.group(3)) + (args.n_layers if m.group(2) == "mtp" else 0)  # V4's MTP: layer n_layers + M
            seen.setdefault(layer, set()).add(int(m.group(4)))
    cal.n_routed_experts = n_experts
    cal.idle_experts = {layer: n_experts - len(e) for layer, e in sorted(seen.items()) if len(e) < n_experts}
    for (prefix, proj), v in per_proj.items():
        for e in range(n_experts):
            name = f"{prefix}.{e}.{proj}"
            if name not in cal.input_scales:
                cal.input_scales[name] = v
                log.debug("calibration: %s saw no token; using the largest scale of the layer's %s", name, proj)
    for name in list(cal.input_scales):
        head, _, leaf = name.rpartition(".")
        for follower, leader in PARTNERS.items():
            if leaf == leader:
                cal.input_scales[f"{head}.{follower}"] = cal.input_scales[name]
    return cal


def calibration_windows(ckpt, text: str, *, seq_len: int = 512, max_tokens: int = 32768, tokenizer=None):
    """Tokenize `text` with the checkpoint's tokenizer (one BOS first) -> int64 windows [W, seq_len]."""
    tok = load_tokenizer(ckpt, tokenizer)
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = ModelCheckpoint(ckpt).args.bos_token_id
    return make_windows(([bos] if bos is not None else []) + ids, seq_len, max_tokens)


def calibrate_all(
    ckpt, text: str, *, seq_len: int = 512, max_tokens: int = 32768, device: str = "cpu", tokenizer=None,
    batch_size: int = 8, method: str = "mse", sample_rows: int = DEFAULT_SAMPLE_ROWS, grid: str = "pow2",
    threads: int | None = None, progress: bool = False,
) -> Calibration:  # fmt: skip
    """Everything one pass over `text` finds: input scales (fallback and partners applied) and KV amaxes.
    threads: torch CPU threads (None: devices.default_threads); progress: tokens/s and time left on stderr."""
    windows = calibration_windows(ckpt, text, seq_len=seq_len, max_tokens=max_tokens, tokenizer=tokenizer)
    with cpu_threads(threads), Progress("calibrate", windows.numel(), enabled=progress) as bar:
        cal = record(ckpt, windows, method=method, device=device, batch_size=batch_size, sample_rows=sample_rows,
                     grid=grid, progress=bar)  # fmt: skip
    return finish(ckpt, cal)


def calibrate(
    ckpt, text: str, *, seq_len: int = 512, max_tokens: int = 32768, device: str = "cpu", tokenizer=None,
    batch_size: int = 8, method: str = "mse", sample_rows: int = DEFAULT_SAMPLE_ROWS, threads: int | None = None,
    progress: bool = False,
) -> dict[str, float]:  # fmt: skip
    """{module: NVFP4 activation input scale}, what dsquant.convert.convert(calibration=...) takes."""
    return calibrate_all(ckpt, text, seq_len=seq_len, max_tokens=max_tokens, device=device, tokenizer=tokenizer,
                         batch_size=batch_size, method=method, sample_rows=sample_rows, threads=threads,
                         progress=progress).input_scales  # fmt: skip
