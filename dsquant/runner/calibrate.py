"""Activation calibration through the layer-streamed pass: NVFP4 input global scales from real activations.

For every linear the runner executes, the absolute maximum of its input over the calibration windows
is recorded (a forward pre-hook while its layer is resident), and the NVFP4 activation global scale
is amax / (448 * 6), the same rule as the weight's (dsquant.formats.nvfp4.nvfp4_global_scale).
The result, {module name: scale}, is what dsquant.convert.convert(calibration=...) takes; fused
partners share their input, so gate/up and q_a/kv_a get the same value.

Experts that receive no calibration token (routing is sparse) fall back to the largest amax recorded
for the same projection (gate_proj/up_proj/down_proj) of any expert in that layer; if no expert of the
layer saw a token, the converter's recipe default stays. FP8 KV-cache scales are not calibrated here.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch

from dsquant.formats.nvfp4 import nvfp4_global_scale
from dsquant.runner.linear import QuantLinear
from dsquant.runner.load import CheckpointReader
from dsquant.runner.offload import stream_logits
from dsquant.runner.perplexity import make_windows
from dsquant.runner.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)$")


def record_input_amax(ckpt, windows: torch.Tensor, *, device: str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """{module name: max |input|} over all windows for every linear the forward runs (experts: those routed to)."""
    amax: dict[str, float] = {}

    def on_layer(layer: int, block: torch.nn.Module) -> None:
        for name, mod in block.named_modules():
            if isinstance(mod, QuantLinear):
                full = f"model.layers.{layer}.{name}"
                mod.register_forward_pre_hook(lambda m, args, full=full: _update(amax, full, args[0]))

    impl = "triton" if str(device).startswith("cuda") else "reference"
    for _ in stream_logits(ckpt, windows, impl=impl, device=device, batch_size=batch_size, on_layer=on_layer):
        pass
    return amax


def _update(amax: dict, name: str, x: torch.Tensor) -> None:
    if x.numel():
        amax[name] = max(amax.get(name, 0.0), float(x.detach().abs().amax()))


def nvfp4_input_scales(ckpt, amax: dict[str, float]) -> dict[str, float]:
    """amax per module -> NVFP4 activation global scales, with the documented fallback for idle experts."""
    args = CheckpointReader(ckpt).args
    per_proj: dict[tuple[str, str], float] = defaultdict(float)
    for name, v in amax.items():
        if m := _EXPERT.match(name):
            per_proj[(m.group(1), m.group(3))] = max(per_proj[(m.group(1), m.group(3))], v)
    filled = dict(amax)
    for (prefix, proj), v in per_proj.items():
        for e in range(args.n_routed_experts):
            name = f"{prefix}.{e}.{proj}"
            if name not in filled:
                filled[name] = v
                log.debug("calibration: %s saw no token; using the layer's max over experts", name)
    return {k: float(nvfp4_global_scale(torch.tensor(v))) for k, v in filled.items() if v > 0}


def calibrate(
    ckpt, text: str, *, seq_len: int = 512, max_tokens: int = 32768, device: str = "cpu",
    tokenizer=None, batch_size: int = 8,
) -> dict[str, float]:  # fmt: skip
    """Tokenize `text` with the checkpoint's tokenizer, stream it through, return {module: input scale}."""
    tok = load_tokenizer(ckpt, tokenizer)
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = CheckpointReader(ckpt).args.bos_token_id
    windows = make_windows(([bos] if bos is not None else []) + ids, seq_len, max_tokens)
    return nvfp4_input_scales(ckpt, record_input_amax(ckpt, windows, device=device, batch_size=batch_size))
