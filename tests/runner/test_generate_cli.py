"""`dsquant generate` and the cached decode path: greedy output equals recomputing the full prefix."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dsquant.cli import app
from dsquant.demo import ASSET_DIR
from dsquant.runner.generate import generate
from dsquant.runner.load import load_model

runner = CliRunner()


def test_cached_greedy_decode_equals_full_recompute():
    model, reader = load_model(ASSET_DIR)
    prompt = [256] + list(b"import os\ndef ")
    g = generate(model, prompt, max_new_tokens=8)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):  # no cache: the whole prefix again each step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert g.token_ids == ids[len(prompt):]


def test_generate_cli_greedy_sampled_and_fp8_cache():
    r = runner.invoke(app, ["generate", str(ASSET_DIR), "def main(", "-n", "6"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("def main(")
    a = runner.invoke(app, ["generate", str(ASSET_DIR), "import ", "-n", "6", "-t", "0.8", "--top-p", "0.9",
                            "--seed", "3", "--kv-cache", "fp8"])  # fmt: skip
    b = runner.invoke(app, ["generate", str(ASSET_DIR), "import ", "-n", "6", "-t", "0.8", "--top-p", "0.9",
                            "--seed", "3", "--kv-cache", "fp8"])  # fmt: skip
    assert a.exit_code == 0 and a.stdout == b.stdout, "a seed must reproduce the sample"


@pytest.mark.parametrize(
    "args,message",
    [(["-n", "0"], "--max-new-tokens must be positive"), (["--top-p", "0"], "top-p"),
     (["--kv-cache", "int4"], "--kv-cache")],
    ids=["n0", "top-p", "kv-cache"],
)  # fmt: skip
def test_generate_errors(args, message):
    r = runner.invoke(app, ["generate", str(ASSET_DIR), "x", *args])
    assert r.exit_code == 1 and message in r.output, r.output


def test_generate_missing_checkpoint(tmp_path):
    r = runner.invoke(app, ["generate", str(tmp_path / "nope"), "x"])
    assert r.exit_code == 1 and "no such checkpoint directory" in r.output


def test_generate_checks_the_length_against_the_context_first(monkeypatch):
    import dsquant.runner.generate as gen

    monkeypatch.setattr(gen, "new_cache", None)  # refused before any cache is built or token decoded
    r = runner.invoke(app, ["generate", str(ASSET_DIR), "x", "-n", "600"])
    # the demo trained on 512-byte windows (dsquant_demo.json); the prompt is BOS + "x"
    assert r.exit_code == 1, r.output
    assert ("the prompt (2 tokens) plus --max-new-tokens 600 exceeds the model's context, 512 tokens (the length it "
            "was trained at, per dsquant_demo.json); use --max-new-tokens 510 or less") in r.output


def test_generate_progress_goes_to_stderr_as_plain_lines():
    r = runner.invoke(app, ["generate", str(ASSET_DIR), "def ", "-n", "5"])
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stderr and r.stderr.splitlines()[-1].startswith("generate: 5/5 tokens (100%), ")
    assert "tokens/s, done" in r.stderr and "generate:" not in r.stdout


def test_fp8_ds_cache_runs_the_runner_and_is_closer_to_bf16_than_the_unscaled_fp8_cache():
    """fp8_ds (a float32 scale per 128 latent values of each token) reaches the runner through the kernels'
    own layout; the demo's 128 + 32 latent is one group per token, so it must track bf16 better than "fp8",
    whose uncalibrated per-tensor scale is 1.0."""
    from dsquant.runner.offload import resident_logits

    model, _ = load_model(ASSET_DIR)
    windows = torch.tensor([[256] + list(b"def main(argv):\n    return sorted(argv)[0]\n")])
    logp = {kv: torch.cat([lg for _, lg in resident_logits(model, windows, kv_cache=kv)]).float().log_softmax(-1)
            for kv in ("bf16", "fp8", "fp8_ds")}  # fmt: skip
    kld = {kv: float((logp["bf16"].exp() * (logp["bf16"] - logp[kv])).sum(-1).mean()) for kv in ("fp8", "fp8_ds")}
    assert 0 < kld["fp8_ds"] < kld["fp8"], kld
    r = runner.invoke(app, ["generate", str(ASSET_DIR), "def main(", "-n", "4", "--kv-cache", "fp8_ds"])
    assert r.exit_code == 0 and r.stdout.startswith("def main("), r.output


def test_fp8_ds_cache_refuses_a_latent_without_its_layout():
    from dsquant.runner.cache import PagedLatentCache

    with pytest.raises(ValueError, match=r"--kv-cache fp8_ds: .*multiple of"):
        PagedLatentCache(1, 1, 8, kv_lora_rank=96, rope_dim=32, kv_dtype="fp8_ds")
