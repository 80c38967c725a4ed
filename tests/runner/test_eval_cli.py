"""`dsquant eval`: output, --json, --save, --kv-cache fp8, --offload layer, and every error path."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.cli import app
from dsquant.demo import ASSET_DIR

runner = CliRunner()
FAST = ["--seq-len", "64", "--max-tokens", "256"]


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("demo") / "demo"
    shutil.copytree(ASSET_DIR, dst)
    return dst


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    ckpt = make_synthetic_checkpoint(tmp_path_factory.mktemp("syn") / "v3", variant="v3", source="bf16", num_shards=1)
    (ckpt / "tokenizer.json").unlink(missing_ok=True)
    return ckpt


def test_eval_prints_protocol_and_table(demo_copy):
    r = runner.invoke(app, ["eval", str(demo_copy), *FAST])
    assert r.exit_code == 0, r.output
    protocol = "protocol: token-level perplexity, 4 non-overlapping windows x 64 tokens (63 scored each, 252 in all)"
    assert protocol in r.output
    assert "heldout text shipped with dsquant" in r.output and "demo" in r.output


def test_eval_json_save_and_base_comparison_with_itself(demo_copy):
    r = runner.invoke(app, ["eval", str(demo_copy), "--base", str(demo_copy), "--json", "--save", *FAST])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    saved = json.loads((demo_copy / "eval_results.json").read_text())
    assert saved == out
    row = out["results"][0]
    assert set(row) == {"name", "ppl", "delta_ppl_pct", "kld", "top1", "tokens", "kv_cache"}
    assert row["kld"] == pytest.approx(0, abs=1e-9) and row["top1"] == 1.0 and row["delta_ppl_pct"] == 0
    assert out["base"]["ppl"] == row["ppl"] and row["tokens"] == 252


def test_eval_fp8_kv_cache_and_layer_offload(demo_copy, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    r = runner.invoke(app, ["eval", str(demo_copy), "--base", str(demo_copy), "--kv-cache", "fp8", "--offload",
                            "layer", "--text-file", str(text), "--json", *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    row = out["results"][0]
    assert row["kv_cache"] == "fp8" and 0 < row["kld"] < 0.05, row  # the cache's cost is measured, and small
    assert out["protocol"]["offload"] == "layer" and len(out["streaming"]["layers"]) == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--seq-len", "64", "--max-tokens", "50"], "fewer than one window of --seq-len 64"),
        (["--seq-len", "1024"], "exceeds the model's context, 512 (the length it was trained at"),
        (["--max-tokens", "0"], "--max-tokens must be positive"),
        (["--text-file", "/nonexistent/x.txt"], "no such text file"),
        (["--dataset", "imagenet"], "only 'wikitext2'"),
        (["--kv-cache", "int4", *FAST], "--kv-cache"),
        (["--offload", "disk", *FAST], "--offload 'disk'"),
        (["--text-file", "x", "--dataset", "wikitext2"], "either --text-file or --dataset"),
    ],
    ids=["seq-len-1", "short-text", "seq-len-too-long", "max-tokens-0", "missing-text", "dataset", "kv-cache",
         "offload", "both"],
)
def test_eval_errors(demo_copy, args, message):
    r = runner.invoke(app, ["eval", str(demo_copy), *args])
    assert r.exit_code == 1, r.output
    assert message in r.output


def test_eval_empty_text_file(demo_copy, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    r = runner.invoke(app, ["eval", str(demo_copy), "--text-file", str(tmp_path / "empty.txt")])
    assert r.exit_code == 1 and "empty" in r.output


@pytest.mark.parametrize("data,message", [
    (bytes(range(256)) * 64, "not UTF-8 text (byte 0x80 at offset 128)"),  # a binary file
    (bytes(range(128)) * 64, "22% of its characters are control characters"),  # 28 of each 128 bytes
    (b"\0" * 4096, "100% of its characters are control characters"),
], ids=["not-utf8", "ascii-binary", "zeros"])
def test_eval_refuses_a_binary_text_file(demo_copy, tmp_path, data, message):
    (tmp_path / "data.bin").write_bytes(data)
    r = runner.invoke(app, ["eval", str(demo_copy), "--text-file", str(tmp_path / "data.bin"), *FAST])
    assert r.exit_code == 1, r.output
    assert f"--text-file {tmp_path / 'data.bin'}: {message}" in r.output and "ppl" not in r.output


def test_eval_missing_checkpoint(tmp_path):
    r = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such checkpoint directory" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path), *FAST])  # a folder that is not a checkpoint
    assert r.exit_code == 1 and "no model.safetensors.index.json or model.safetensors" in r.output


def test_eval_without_tokenizer_is_a_clear_error_unless_given(no_tokenizer, demo_copy, tmp_path):
    r = runner.invoke(app, ["eval", str(no_tokenizer), *FAST])
    assert r.exit_code == 1 and "no tokenizer.json found; pass --tokenizer" in r.output
    r = runner.invoke(app, ["eval", str(no_tokenizer), "--tokenizer", str(demo_copy), *FAST])
    assert r.exit_code == 0, r.output
    (tmp_path / "bad.json").write_text("{not json")
    r = runner.invoke(app, ["eval", str(no_tokenizer), "--tokenizer", str(tmp_path / "bad.json"), *FAST])
    assert r.exit_code == 1 and "not a valid tokenizer.json" in r.output


def test_eval_cuda_request_without_gpu(demo_copy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = runner.invoke(app, ["eval", str(demo_copy), "--device", "cuda", *FAST])
    assert r.exit_code == 1 and "CUDA is not available" in r.output


# --- defaults from the model, progress, threads, the shipped text ---------------------------------------------


def test_eval_with_no_arguments_uses_the_demos_own_window_and_size():
    r = runner.invoke(app, ["eval", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["protocol"]
    # the demo trained on 512-byte windows and its table scores 8192 tokens (assets/demo/dsquant_demo.json)
    assert (p["seq_len"], p["windows"], p["tokens_scored"]) == (512, 16, 16 * 511)


def test_a_real_models_window_is_bounded_by_max_position_embeddings(tmp_path):
    ckpt = make_synthetic_checkpoint(tmp_path / "v3", variant="v3", source="bf16", num_shards=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "dsquant_demo.json" not in {p.name for p in ckpt.iterdir()}
    cfg["max_position_embeddings"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["eval", str(ckpt), "--max-tokens", "200", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["protocol"]["seq_len"] == 96
    r = runner.invoke(app, ["eval", str(ckpt), "--seq-len", "128"])
    assert r.exit_code == 1 and "exceeds the model's context, 96 (max_position_embeddings in config.json)" in r.output


def test_eval_progress_is_one_plain_line_per_step_off_a_terminal(demo_copy):
    r = runner.invoke(app, ["eval", str(demo_copy), "--base", str(demo_copy), *FAST])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and len(lines) == 2, r.stderr  # 4 windows, batch 4: one step per model
    assert re.fullmatch(r"eval: 256/512 tokens \(50%\), [\d,]+ tokens/s, \S+ s left", lines[0]), lines[0]
    assert re.fullmatch(r"eval: 512/512 tokens \(100%\), [\d,]+ tokens/s, done", lines[1]), lines[1]
    r = runner.invoke(app, ["eval", str(demo_copy), "--json", *FAST])
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)  # --json: nothing but the JSON


def test_eval_threads_are_chosen_and_restored(demo_copy, monkeypatch):
    import torch

    from dsquant.runner import evaluate as ev

    before, seen, make_windows = torch.get_num_threads(), [], ev.make_windows

    def spy(*a, **k):  # the thread count in force while the eval runs
        seen.append(torch.get_num_threads())
        return make_windows(*a, **k)

    monkeypatch.setattr(ev, "make_windows", spy)
    r = runner.invoke(app, ["eval", str(demo_copy), "--threads", "1", "--json", *FAST])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["protocol"]["threads"] == 1 and seen == [1]
    assert torch.get_num_threads() == before
    r = runner.invoke(app, ["eval", str(demo_copy), "--threads", "0", *FAST])
    assert r.exit_code == 2 and "--threads" in r.output


def test_the_default_text_does_not_depend_on_the_local_python(demo_copy, tmp_path, monkeypatch):
    import sysconfig

    from dsquant.runner.data import SHIPPED_DIR

    want = runner.invoke(app, ["eval", str(demo_copy), "--json", *FAST])
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path)})  # no stdlib at all
    got = runner.invoke(app, ["eval", str(demo_copy), "--json", *FAST])
    assert want.exit_code == 0 and got.exit_code == 0, got.output
    a, b = json.loads(want.stdout), json.loads(got.stdout)
    assert a["results"][0]["ppl"] == b["results"][0]["ppl"]
    text = (SHIPPED_DIR / "heldout.txt").read_text(encoding="utf-8")
    assert b["protocol"]["text"]["chars"] == len(text)
