"""Publishing to the Hub, offline: a fake HfApi records calls."""

from __future__ import annotations

import json
import logging

import pytest
from huggingface_hub import constants

import dsquant.publish as publish
from dsquant.model_card import CARD_MARKER, render_model_card
from tests.check.ckpt_factory import build

FAKE_TOKEN = "hf_FAKEtokenTHATmustNEVERbeSHOWN1234567890"


class FakeApi:
    """Records each call (name, args, kwargs); `large` decides whether upload_large_folder exists."""

    instances: list[FakeApi] = []

    def __init__(self, token=None, large=False):
        self.token, self.calls = token, []
        if large:
            self.upload_large_folder = lambda **kw: self.calls.append(("upload_large_folder", (), kw))
        FakeApi.instances.append(self)

    def create_repo(self, *args, **kw):
        self.calls.append(("create_repo", args, kw))
        return f"https://huggingface.co/{args[0]}"

    def create_branch(self, *args, **kw):
        self.calls.append(("create_branch", args, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", (), kw))


def make_output(tmp_path, recipe_extra=None):
    out = build("modelopt").write(tmp_path / "out")
    recipe = {"dsquant_version": "0.1.0", "recipe": {"name": "nvfp4", "version": 1, "resolved": {}},
              "convention": "modelopt", "source": {"repo_id": "deepseek-ai/DeepSeek-V3", "revision": "main"},
              "bytes_in": 2000, "bytes_out": 1000, "tensors": {"nvfp4": 18}, **(recipe_extra or {})}
    (out / "dsquant_recipe.json").write_text(json.dumps(recipe))
    return out


def test_push_calls_in_order_with_a_branch(tmp_path):
    out = make_output(tmp_path)
    api = FakeApi()
    result = publish.push_to_hub(out, "me/model-nvfp4", private=True, revision="v1", commit_message="first", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == ("me/model-nvfp4",) and api.calls[0][2]["exist_ok"] is True
    assert api.calls[0][2]["private"] is True
    assert api.calls[1][2] == {"branch": "v1", "exist_ok": True, "repo_type": "model"}
    up = api.calls[2][2]
    assert up["revision"] == "v1" and up["commit_message"] == "first" and up["folder_path"] == out
    assert result.url == "https://huggingface.co/me/model-nvfp4"
    assert CARD_MARKER in (out / "README.md").read_text()  # the card was refreshed before the upload


def test_push_prefers_the_resumable_large_folder_upload(tmp_path):
    out = make_output(tmp_path)
    api = FakeApi(large=True)
    publish.push_to_hub(out, "me/model", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_large_folder"]
    assert api.calls[1][2]["repo_type"] == "model" and api.calls[1][2]["ignore_patterns"] == publish.UPLOAD_IGNORE


def test_token_reaches_hfapi_and_nowhere_else(tmp_path, monkeypatch, capsys, caplog):
    out = make_output(tmp_path)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(publish, "HfApi", FakeApi)
    FakeApi.instances.clear()
    caplog.set_level(logging.DEBUG)
    publish.push_to_hub(out, "me/model", api=None)
    assert FakeApi.instances[-1].token == FAKE_TOKEN  # the real get_token() found HF_TOKEN
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_missing_token_is_a_clear_error(tmp_path, monkeypatch):
    out = make_output(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="no Hugging Face token found: set HF_TOKEN"):
        publish.push_to_hub(out, "me/model")


def test_dry_run_lists_files_and_bytes_without_calls(tmp_path):
    out = make_output(tmp_path)
    (out / ".dsquant-stray.partial").write_text("x")  # hidden leftovers are never uploaded
    api = FakeApi()
    result = publish.push_to_hub(out, "me/model", dry_run=True, api=api)
    assert api.calls == []
    assert not (out / "README.md").exists()  # a dry run writes nothing; the card it would write is listed
    card = render_model_card(out, repo_id="me/model").encode()
    expected = sorted([(p.name, p.stat().st_size) for p in out.iterdir() if not p.name.startswith(".")] +
                      [("README.md", len(card))])
    assert result.files == expected and result.total_bytes == sum(n for _, n in expected)


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "-bad/name", "org/na me", "org--x/name", "org/..x", ""])
def test_repo_id_of_the_wrong_shape(tmp_path, repo_id):
    with pytest.raises(ValueError, match="not of the form ORG/NAME"):
        publish.push_to_hub(make_output(tmp_path), repo_id, api=FakeApi())


def test_refuses_a_folder_that_is_not_a_dsquant_output(tmp_path):
    plain = build("bf16").write(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a dsquant output \\(missing dsquant_recipe.json\\)"):
        publish.push_to_hub(plain, "me/model", api=FakeApi())
    with pytest.raises(ValueError, match="not a directory"):
        publish.push_to_hub(tmp_path / "nothing", "me/model", api=FakeApi())


def test_refuses_an_unfinished_conversion(tmp_path):
    out = make_output(tmp_path)
    (out / ".dsquant-manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="unfinished conversion"):
        publish.push_to_hub(out, "me/model", api=FakeApi())


def test_a_hand_edited_card_is_kept(tmp_path):
    out = make_output(tmp_path)
    (out / "README.md").write_text("---\nlicense: mit\n---\nmy own words\n")
    publish.push_to_hub(out, "me/model", api=FakeApi())
    assert (out / "README.md").read_text().endswith("my own words\n")


def test_refuses_a_checkpoint_that_fails_the_loading_checks(tmp_path):
    out = make_output(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}  # a stale source config beside NVFP4 weights
    (out / "config.json").write_text(json.dumps(cfg))
    api = FakeApi()
    with pytest.raises(ValueError, match="fails .* engine loading check.*stale-quant-config.*--no-check"):
        publish.push_to_hub(out, "me/model", api=api)
    assert api.calls == []
    publish.push_to_hub(out, "me/model", api=api, check=False)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
