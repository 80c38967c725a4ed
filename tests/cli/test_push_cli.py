"""`dsquant push`: dry run, success with a fake HfApi, and every error path (non-zero exit, clear message)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

import dsquant.publish as publish
from dsquant.cli import app
from dsquant.model_card import CARD_MARKER, render_model_card
from tests.check.ckpt_factory import build

runner = CliRunner()
FAKE_TOKEN = "hf_CLIfakeTOKENneverPRINTED0987654321"


class RecordingApi:
    last = None

    def __init__(self, token=None):
        self.token, self.calls = token, []
        RecordingApi.last = self

    def create_repo(self, repo_id, **kw):
        self.calls.append("create_repo")
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append("create_branch")

    def upload_folder(self, **kw):
        self.calls.append("upload_folder")


def output_dir(tmp_path):
    out = build("ct-nvfp4").write(tmp_path / "out")
    recipe = {"recipe": {"name": "nvfp4"}, "convention": "compressed-tensors",
              "source": {"repo_id": "deepseek-ai/DeepSeek-V3"}}
    (out / "dsquant_recipe.json").write_text(json.dumps(recipe))
    return out


def test_dry_run_lists_files_and_bytes(tmp_path):
    out = output_dir(tmp_path)
    result = runner.invoke(app, ["push", str(out), "--repo-id", "me/tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    size = (out / "config.json").stat().st_size
    assert any(line.split() == [f"{size:,d}", "config.json"] for line in result.output.splitlines())
    card = len(render_model_card(out, repo_id="me/tiny").encode())  # the card a real push writes first
    assert any(line.split() == [f"{card:,d}", "README.md"] for line in result.output.splitlines())
    files = [p for p in out.iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files) + card
    assert f"would upload {len(files) + 1} files" in result.output
    assert f"({total:,d} bytes) to me/tiny" in result.output


@pytest.mark.parametrize("card", ["none", "generated", "edited"])
def test_dry_run_changes_nothing_on_disk(tmp_path, card):
    out = output_dir(tmp_path)
    if card != "none":
        (out / "README.md").write_text((CARD_MARKER + "\n" if card == "generated" else "") + "an older card\n")

    def state():  # every file's bytes and mtime, and the folder's own mtime (a file made and removed shows)
        return out.stat().st_mtime_ns, {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*")
                                        if p.is_file()}

    before = state()
    result = runner.invoke(app, ["push", str(out), "--repo-id", "me/tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert state() == before


def test_push_with_token_never_prints_it(tmp_path, monkeypatch):
    out = output_dir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(publish, "HfApi", RecordingApi)
    result = runner.invoke(app, ["push", str(out), "--repo-id", "me/tiny", "--revision", "dev", "--private"])
    assert result.exit_code == 0, result.output
    assert RecordingApi.last.token == FAKE_TOKEN
    assert RecordingApi.last.calls == ["create_repo", "create_branch", "upload_folder"]
    assert "pushed" in result.output and "(branch dev)" in result.output
    assert FAKE_TOKEN not in result.output
    assert all(FAKE_TOKEN.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_missing_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "absent"))
    result = runner.invoke(app, ["push", str(output_dir(tmp_path)), "--repo-id", "me/tiny"])
    assert result.exit_code == 1 and "no Hugging Face token found" in result.output


def test_repo_id_of_the_wrong_shape(tmp_path):
    result = runner.invoke(app, ["push", str(output_dir(tmp_path)), "--repo-id", "just-a-name", "--dry-run"])
    assert result.exit_code == 1 and "not of the form ORG/NAME" in result.output


def test_not_a_dsquant_output(tmp_path):
    plain = build("bf16").write(tmp_path / "plain")
    result = runner.invoke(app, ["push", str(plain), "--repo-id", "me/tiny", "--dry-run"])
    assert result.exit_code == 1 and "not a dsquant output" in result.output


def test_missing_repo_id_option(tmp_path):
    result = runner.invoke(app, ["push", str(output_dir(tmp_path))])
    assert result.exit_code == 2 and "--repo-id" in result.output


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    class Failing(RecordingApi):
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("network unreachable")

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(publish, "HfApi", Failing)
    result = runner.invoke(app, ["push", str(output_dir(tmp_path)), "--repo-id", "me/tiny"])
    assert result.exit_code == 1
    assert "push to me/tiny failed: ConnectionError: network unreachable (run the same command again" in result.output
    assert "Traceback" not in result.output and FAKE_TOKEN not in result.output


def test_interrupted_push_says_how_to_resume(tmp_path, monkeypatch):
    class Interrupted(RecordingApi):
        def upload_folder(self, **kw):
            raise KeyboardInterrupt

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(publish, "HfApi", Interrupted)
    result = runner.invoke(app, ["push", str(output_dir(tmp_path)), "--repo-id", "me/tiny"])
    assert result.exit_code == 130 and "run the same command again to resume" in result.output


def test_failing_checkpoint_is_not_pushed_without_no_check(tmp_path, monkeypatch):
    out = output_dir(tmp_path)
    (out / "model-00001-of-00002.safetensors").unlink()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(publish, "HfApi", RecordingApi)
    RecordingApi.last = None
    result = runner.invoke(app, ["push", str(out), "--repo-id", "me/tiny"])
    assert result.exit_code == 1 and "engine loading check" in result.output and RecordingApi.last is None
    forced = runner.invoke(app, ["push", str(out), "--repo-id", "me/tiny", "--no-check"])
    assert forced.exit_code == 0 and RecordingApi.last.calls[-1] == "upload_folder"
