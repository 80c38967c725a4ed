"""Each compressed-tensors module runs its own scheme: weights and activations as its config group declares.

References come from compressed_tensors itself: its compressor writes the FP8 checkpoints' bytes, its
decompressor gives the weights, and its activation quantizer (`compute_dynamic_scales_and_zp` + `fake_quantize`)
gives the activations a scheme's kernel multiplies.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.runner.linear import QuantLinear
from dsquant.runner.load import load_model

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed in this env")
from compressed_tensors.compressors.base import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp  # noqa: E402

from tests.ct_library import library_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("src") / "v3", variant="v3", source="bf16", num_shards=1,
                                     n_routed_experts=4)


def _library_output(mod: QuantLinear, local: dict, scheme: QuantizationScheme, x: torch.Tensor) -> torch.Tensor:
    """compressed_tensors' own numerics for one linear: its activation quantizer, its weight decompression."""
    # The library's own dequantization, in float32: its decompressor would round the product to the scale's dtype
    # (BF16), which no FP8 GEMM does (engines apply the scales to the float32 accumulator).
    w = dequantize(local["weight"], local["weight_scale"].float(), args=scheme.weights, dtype=torch.float32)
    args = scheme.input_activations
    if args is None:
        return x @ w.t()
    if args.dynamic:  # the library reduces per token over [batch, seq, hidden] activations
        scale, zp = compute_dynamic_scales_and_zp(x[None], args, mod)
        return (fake_quantize(x[None], scale, zp, args) @ w.t())[0]
    else:
        scale, zp = local["input_scale"].float(), None
    return fake_quantize(x, scale, zp, args) @ w.t()


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8"])
def test_fp8_channel_and_tensor_presets_evaluate_as_the_library_computes(tmp_path, bf16_source, preset):
    dst = library_checkpoint(bf16_source, tmp_path / preset, preset)
    model, reader = load_model(dst)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    ckpt = Checkpoint(dst)
    x = torch.randn(7, model.args.dim, generator=torch.Generator().manual_seed(0)) * 0.05
    checked = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear) or mod.in_features != model.args.dim or name == "lm_head":
            continue
        assert mod.w.fmt == "fp8-channel", name
        local = {n[len(name) + 1:]: ckpt.get(n) for n in ckpt.infos if n.startswith(name + ".")}
        expected = _library_output(mod, local, scheme, x)
        actual = mod(x)
        err = (actual - expected).abs().max() / expected.abs().max()
        assert err < 1e-6, f"{preset} {name}: relative difference {err:.2e} from compressed-tensors"
        checked += 1
    assert checked > 10
    tokens = torch.randint(0, reader.args.vocab_size, (1, 9))
    assert torch.isfinite(model(tokens)).all()


def test_mxfp4_recipe_experts_run_weight_only(tmp_path, bf16_source):
    """The mxfp4 recipe's experts declare input_activations null (W4A16): no activation quantization for them,
    while its FP8-block attention keeps dynamic 1x128 FP8 activations."""
    from dsquant.convert import convert

    dst = tmp_path / "mxfp4"
    convert(bf16_source, dst, "mxfp4", convention="compressed-tensors", progress=False)
    model, _ = load_model(dst)
    ckpt = Checkpoint(dst)
    qc = ckpt.config["quantization_config"]
    x = torch.randn(5, model.args.dim, generator=torch.Generator().manual_seed(1))
    experts = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear) or ".mlp.experts." not in name or not name.endswith(("gate_proj",
                                                                                                "up_proj")):
            continue
        group = next(g for g in qc["config_groups"].values() if g["format"] == "mxfp4-pack-quantized")
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                    input_activations=group["input_activations"])
        local = {n[len(name) + 1:]: ckpt.get(n) for n in ckpt.infos if n.startswith(name + ".")}
        w = BaseCompressor.get_value_from_registry("mxfp4-pack-quantized").decompress(local, scheme)["weight"]
        expected = x @ w.float().t()  # MXFP4 values are exact in BF16, so this is the W4A16 product
        assert torch.allclose(mod(x), expected, rtol=1e-6, atol=1e-6), f"{name}: experts must run W4A16"
        experts += 1
    assert experts >= 8
    attn = model.model.layers[0].self_attn.o_proj
    assert (attn.w.fmt, attn.w.act) == ("fp8-block", "fp8_group")


def test_mxfp4_demo_logits_match_a_weight_only_reference(tmp_path):
    """The bundled demo converted with the mxfp4 recipe evaluates its experts W4A16: its logits are those of
    the same model whose expert weights are the library-decompressed MXFP4 values run without any activation
    quantization (attention keeps its FP8-block weights and activations in both)."""
    from dsquant.convert import convert
    from dsquant.demo import ASSET_DIR
    from dsquant.formats.weight import QuantizedWeight

    dst = tmp_path / "demo-mxfp4"
    convert(ASSET_DIR, dst, "mxfp4", convention="compressed-tensors", progress=False)
    model, _ = load_model(dst)
    reference, _ = load_model(dst)
    ckpt = Checkpoint(dst)
    group = next(g for g in ckpt.config["quantization_config"]["config_groups"].values()
                 if g["format"] == "mxfp4-pack-quantized")
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"], input_activations=None)
    replaced = 0
    for name, mod in reference.named_modules():
        if isinstance(mod, QuantLinear) and ".mlp.experts." in name:
            local = {n[len(name) + 1:]: ckpt.get(n) for n in ckpt.infos if n.startswith(name + ".")}
            w = BaseCompressor.get_value_from_registry("mxfp4-pack-quantized").decompress(local, scheme)["weight"]
            mod.set_weight(QuantizedWeight("bf16", w.float()), name=name)
            replaced += 1
    assert replaced == 3 * 8 * 3  # gate/up/down of 8 experts in each of the 3 MoE layers
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        actual, expected = model(tokens), reference(tokens)
    # Float32 both ways; only the summation order of the expert products differs (~1e-6 relative).
    err = (actual - expected).abs().max().item()
    assert err < 1e-3 * expected.abs().max().item(), f"max |logit diff| {err:.3e}: experts ran with quantized inputs"


@pytest.mark.parametrize("change,named", [
    (lambda g: g.update(weights={"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                 "group_size": 128, "dynamic": False}), "int4 group(128)"),
    (lambda g: g["input_activations"].update(symmetric=False), "asymmetric"),
    (lambda g: g["input_activations"].update(strategy="group", group_size=64), "float8 group(64)"),
], ids=["int4_weights", "asymmetric_activations", "unpaired_activation_groups"])
def test_schemes_the_runner_cannot_execute_are_refused_by_name(tmp_path, bf16_source, change, named):
    dst = library_checkpoint(bf16_source, tmp_path / "fp8", "FP8_DYNAMIC")
    config = json.loads((dst / "config.json").read_text())
    change(config["quantization_config"]["config_groups"]["group_0"])
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"model\.layers\.\d+\..*compressed-tensors scheme .*{re.escape(named)}"):
        load_model(dst)


def test_eval_cli_names_a_scheme_it_cannot_execute(tmp_path, bf16_source):
    from typer.testing import CliRunner

    from dsquant.cli import app

    dst = library_checkpoint(bf16_source, tmp_path / "w4a16", "FP8_DYNAMIC")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"].update(
        weights={"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                 "dynamic": False}, input_activations=None)
    (dst / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["eval", str(dst), "--seq-len", "16", "--max-tokens", "64"])
    assert r.exit_code == 1, r.output
    assert "compressed-tensors scheme (weights int4 group(128)" in r.output and "Traceback" not in r.output
