"""The bundled DeepSeek-V4 demo (dsquant/assets/demo-v4/): stored as the V4 release stores its tensors, loaded by
the runner, and the runner's logits are transformers' DeepseekV4ForCausalLM's on the same stored values (the
reference dequantizes with transformers' own Fp8Dequantize, as test_v4_formats does); `inspect --check` is clean;
a trainer step of the V4 family exports a checkpoint the runner loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsquant.checkpoint.names_v4 import expected_tensors, scale_name
from dsquant.cli import app
from dsquant.demo import V4_ASSET_DIR, demo_model_dir
from dsquant.runner.load import load_model
from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.load import load_tensors
from dsquant.runner.v4.model import Transformer
from tests.runner.test_v4_formats import dequantized_by_transformers
from tests.runner.test_v4_vs_transformers import max_rel_err

transformers = pytest.importorskip("transformers")
runner = CliRunner()
# safetensors dtype of each names_v4 kind in the instruct release (FP4 experts, E8M0 grids beside them)
RELEASE_DTYPES = {"bf16": (torch.bfloat16,), "f32": (torch.float32,), "i64": (torch.int64,)}


def test_v4_demo_is_stored_as_the_release():
    config = json.loads((V4_ASSET_DIR / "config.json").read_text())
    tensors = load_file(str(V4_ASSET_DIR / "model.safetensors"))
    specs = expected_tensors(config)
    quantized = {scale_name(s.name) for s in specs if s.kind in ("fp8", "expert")}
    assert set(tensors) == {s.name for s in specs} | quantized
    kinds = {s.kind for s in specs}
    assert kinds == {"bf16", "f32", "i64", "fp8", "expert"}  # every stored kind of the release is present
    for s in specs:
        t = tensors[s.name]
        if s.kind == "fp8":
            assert t.dtype == torch.float8_e4m3fn and tensors[scale_name(s.name)].dtype == torch.float8_e8m0fnu
        elif s.kind == "expert":
            assert t.dtype == torch.int8 and t.shape[1] * 2 == s.shape[1], s.name
            assert tensors[scale_name(s.name)].dtype == torch.float8_e8m0fnu, s.name
        else:
            assert t.dtype in RELEASE_DTYPES[s.kind], s.name
    args = V4Args.from_config(config)
    assert {0, 4, 128} <= set(args.compress_ratios) and 0 < args.n_hash_layers < args.n_layers
    assert args.hc_mult > 1
    assert sum(f.stat().st_size for f in V4_ASSET_DIR.glob("*.safetensors")) < 6e6
    assert demo_model_dir("deepseek_v4") == V4_ASSET_DIR


def test_v4_demo_logits_are_transformers(tmp_path):
    config = json.loads((V4_ASSET_DIR / "config.json").read_text())
    quantized = load_file(str(V4_ASSET_DIR / "model.safetensors"))
    save_file(dequantized_by_transformers(quantized), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    ours = Transformer(V4Args.from_config(config)).eval()
    load_tensors(ours, quantized, config["quantization_config"], act="none")
    assert {m.w.fmt for m in ours.modules() if getattr(m, "w", None) is not None} == {"bf16", "fp8-block", "mxfp4"}
    text = (V4_ASSET_DIR.parent / "demo" / "eval" / "heldout.txt").read_bytes()[:300]
    tokens = torch.tensor([[config["bos_token_id"], *text]])  # byte-level: ids are the bytes
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        actual = ours(tokens)
    err = max_rel_err(actual, expected)
    assert err < 1e-4, f"max |logit diff| / max |logit| = {err:.3e}"
    # trained, not random: the next byte of held-out source is mostly predicted
    assert (expected[0, :-1].argmax(-1) == tokens[0, 1:]).float().mean() > 0.3


def test_v4_demo_loads_in_the_runner_with_its_settings():
    model, reader = load_model(V4_ASSET_DIR)
    assert reader.family == "deepseek_v4"
    assert json.loads((V4_ASSET_DIR / "dsquant_demo.json").read_text())["context_length"] == 512


def test_v4_demo_inspect_check_is_clean():
    r = runner.invoke(app, ["inspect", str(V4_ASSET_DIR), "--check"])
    assert r.exit_code == 0, r.output
    assert "check: no problems found" in r.output


def test_v4_trainer_exports_a_checkpoint_the_runner_loads(tmp_path, monkeypatch):
    from dsquant.runner import demo_train

    # a few short windows of the shipped text instead of the local stdlib: the path, not the model, is under test
    text = torch.tensor(list((V4_ASSET_DIR.parent / "demo" / "eval" / "calibration.txt").read_bytes()[:4096]))
    monkeypatch.setattr(demo_train, "byte_stream", lambda split: text)
    demo_train.train(tmp_path / "f32", steps=2, max_seconds=60, device="cpu", batch=1, seq_len=160, family="v4")
    demo_train.export(tmp_path / "f32", tmp_path / "out")
    trained = load_file(str(tmp_path / "f32" / "model.safetensors"))
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(stored["layers.0.ffn.gate.tid2eid"], trained["layers.0.ffn.gate.tid2eid"])
    assert torch.equal(stored["layers.1.hc_attn_fn"], trained["layers.1.hc_attn_fn"])  # F32 kept exactly
    assert stored["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    model, reader = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[256, 100, 101]]))).all()
