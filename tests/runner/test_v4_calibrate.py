"""`dsquant convert --calibrate` on a DeepSeek-V4 checkpoint: the layer-streamed pass sets the NVFP4 experts'
input_scale, the MTP block's included. Reference: the same windows through the whole model resident (model.forward,
no streaming, no calibration hooks, then the MTP block on the last streams and the next tokens), each routed
expert's w1 and w2 inputs recorded by plain forward pre-hooks, the amax rule applied by hand, the idle-expert
fallback and w1 / w3 sharing as calibrate.py documents them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsquant.checkpoint.synth_v4 import make_synthetic_v4_checkpoint
from dsquant.cli import app
from dsquant.runner.calibrate import calibration_windows
from dsquant.runner.load import load_model
from dsquant.runner.offload import resident_logits
from tests.written_scales import written_input_scales

runner = CliRunner()
TEXT = Path(__file__).read_text()
EXPERT = re.compile(r"^(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2)$")


def reference_input_scales(ckpt: Path, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    model, reader = load_model(ckpt, mtp=True)
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    for name, mod in model.named_modules():
        if EXPERT.match(name):
            mod.register_forward_pre_hook(record(name))
    last = []
    model.layers[-1].register_forward_hook(lambda mod, args, out: last.append(out))
    for _ in resident_logits(model, windows, batch_size=8):
        pass
    with torch.no_grad():
        for h, tokens in zip(last, windows.split(8)):
            nxt = tokens[:, 1:]
            model.mtp[0].draft(h[:, :-1], model.embed(nxt, model.dtype), model.ropes(nxt.shape[1], h.device), nxt)
    out = {}
    n_experts = reader.args.n_routed_experts
    prefixes = [f"layers.{layer}" for layer in range(reader.args.n_layers)] + ["mtp.0"]
    for prefix in prefixes:
        for proj in ("w1", "w2"):
            names = [f"{prefix}.ffn.experts.{e}.{proj}" for e in range(n_experts)]
            layer_max = max(amax[n] for n in names if n in amax)  # experts no token reached take this
            for n in names:
                out[n] = (amax.get(n, layer_max) / 2688.0).float()
        for e in range(n_experts):
            out[f"{prefix}.ffn.experts.{e}.w3"] = out[f"{prefix}.ffn.experts.{e}.w1"]
    return out


@pytest.fixture(scope="module")
def v4_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4cal")
    src = make_synthetic_v4_checkpoint(root / "src", variant="flash", num_shards=2)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return src, text


def test_v4_calibrated_input_scales_are_the_resident_reference(v4_source, tmp_path):
    src, text = v4_source
    dst = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(src), str(dst), "-r", "nvfp4", "--calibrate", str(text),
                            "--calib-method", "amax"])  # fmt: skip
    assert r.exit_code == 0, r.output
    written = written_input_scales(dst)
    expected = reference_input_scales(src, calibration_windows(src, TEXT))
    assert set(written) == set(expected)
    assert any(m.startswith("mtp.0.") for m in expected), "the MTP block's experts are NVFP4 and calibrated"
    for module, value in expected.items():
        assert torch.equal(written[module], value), f"{module}: {written[module]} != {value}"
    mtp = {float(v) for m, v in written.items() if m.startswith("mtp.")}
    assert len(mtp) > 1 and mtp != {1.0}  # the MTP experts' own values, not the recipe default
    assert json.loads((dst / "dsquant_recipe.json").read_text())["activation_scales"] == "calibrated"


def test_v4_uncalibrated_input_scales_are_the_recipe_default(v4_source, tmp_path):
    src, _ = v4_source
    dst = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(src), str(dst), "-r", "nvfp4"])
    assert r.exit_code == 0, r.output
    assert {float(v) for v in written_input_scales(dst).values()} == {1.0}
