"""Hub publishing and hf:// sources, offline: a fake HfApi records calls; a hand-built cache serves hf://."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from types import SimpleNamespace

import pytest
from huggingface_hub import constants

import dsquant.hub as hub
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
    result = hub.push_to_hub(out, "me/model-nvfp4", private=True, revision="v1", commit_message="first", api=api)
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
    hub.push_to_hub(out, "me/model", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_large_folder"]
    assert api.calls[1][2]["repo_type"] == "model" and api.calls[1][2]["ignore_patterns"] == hub.UPLOAD_IGNORE


def test_token_reaches_hfapi_and_nowhere_else(tmp_path, monkeypatch, capsys, caplog):
    out = make_output(tmp_path)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    FakeApi.instances.clear()
    caplog.set_level(logging.DEBUG)
    hub.push_to_hub(out, "me/model", api=None)
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
        hub.push_to_hub(out, "me/model")


def test_dry_run_lists_files_and_bytes_without_calls(tmp_path):
    out = make_output(tmp_path)
    (out / ".dsquant-stray.partial").write_text("x")  # hidden leftovers are never uploaded
    api = FakeApi()
    result = hub.push_to_hub(out, "me/model", dry_run=True, api=api)
    assert api.calls == []
    assert not (out / "README.md").exists()  # a dry run writes nothing; the card it would write is listed
    card = render_model_card(out, repo_id="me/model").encode()
    expected = sorted([(p.name, p.stat().st_size) for p in out.iterdir() if not p.name.startswith(".")] +
                      [("README.md", len(card))])
    assert result.files == expected and result.total_bytes == sum(n for _, n in expected)


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "-bad/name", "org/na me", "org--x/name", "org/..x", ""])
def test_repo_id_of_the_wrong_shape(tmp_path, repo_id):
    with pytest.raises(ValueError, match="not of the form ORG/NAME"):
        hub.push_to_hub(make_output(tmp_path), repo_id, api=FakeApi())


def test_refuses_a_folder_that_is_not_a_dsquant_output(tmp_path):
    plain = build("bf16").write(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a dsquant output \\(missing dsquant_recipe.json\\)"):
        hub.push_to_hub(plain, "me/model", api=FakeApi())
    with pytest.raises(ValueError, match="not a directory"):
        hub.push_to_hub(tmp_path / "nothing", "me/model", api=FakeApi())


def test_refuses_an_unfinished_conversion(tmp_path):
    out = make_output(tmp_path)
    (out / ".dsquant-manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="unfinished conversion"):
        hub.push_to_hub(out, "me/model", api=FakeApi())


def test_a_hand_edited_card_is_kept(tmp_path):
    out = make_output(tmp_path)
    (out / "README.md").write_text("---\nlicense: mit\n---\nmy own words\n")
    hub.push_to_hub(out, "me/model", api=FakeApi())
    assert (out / "README.md").read_text().endswith("my own words\n")


# --- hf:// sources ---------------------------------------------------------------------------------


def test_local_source_is_returned_as_is(tmp_path):
    assert hub.resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="not a directory"):
        hub.resolve_source(str(tmp_path / "missing"))


@pytest.mark.parametrize("spec", ["hf://", "hf://onlyname", "hf://a/b/c", "hf://a/b@", "hf://a/b@x@y", "hf:/a/b"])
def test_bad_hf_specs(spec):
    with pytest.raises(ValueError):
        hub.resolve_source(spec)


def _populate_cache(cache, repo, files: dict[str, bytes], commit="0" * 40, ref="main"):
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hf_source_from_the_offline_cache(tmp_path, offline_cache):
    src = build("bf16").write(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    snap = _populate_cache(offline_cache, "deepseek-ai/Tiny", files, commit="a" * 40)
    assert hub.resolve_source("hf://deepseek-ai/Tiny") == snap
    assert hub.resolve_source("hf://deepseek-ai/Tiny@" + "a" * 40) == snap


def test_hf_source_cache_miss_offline(offline_cache):
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.resolve_source("hf://deepseek-ai/NotCached")


def test_hf_source_incomplete_snapshot(tmp_path, offline_cache):
    src = build("bf16").write(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.name != "model-00002-of-00002.safetensors"}
    _populate_cache(offline_cache, "deepseek-ai/Partial", files)
    with pytest.raises(ValueError, match="1 shard\\(s\\) missing .*HF_HUB_OFFLINE"):
        hub.resolve_source("hf://deepseek-ai/Partial")


def test_hf_source_downloads_only_what_conversion_needs(tmp_path, monkeypatch):
    seen = {}

    def fake_snapshot_download(repo, **kw):
        seen.update(kw, repo=repo)
        return str(build("bf16").write(tmp_path / "snap"))

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "check_reachable", lambda what: None)  # no request leaves the test
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.resolve_source("hf://org/name@dev")
    assert seen["repo"] == "org/name" and seen["revision"] == "dev" and seen["local_files_only"] is False

    def wanted(path):
        return any(fnmatch.fnmatch(path, p) for p in seen["allow_patterns"])

    for path in ("config.json", "model-00001-of-00163.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "tiktoken.model"):
        assert wanted(path), path
    for path in ("pytorch_model.bin", "model.pt", "consolidated.pth", "figures/fig1.png", "model.gguf"):
        assert not wanted(path), path


def test_hf_source_errors_from_the_hub_are_named(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    response = SimpleNamespace(headers={}, status_code=404, request=None, url="https://huggingface.co")

    def raiser(exc):
        def f(repo, **kw):
            raise exc("boom", response=response)
        return f

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "check_reachable", lambda what: None)  # no request leaves the test
    for exc, text in ((RepositoryNotFoundError, "not found"), (RevisionNotFoundError, "revision 'r' not found")):
        monkeypatch.setattr(hub, "snapshot_download", raiser(exc))
        with pytest.raises(ValueError, match=text):
            hub.resolve_source("hf://org/name@r")
    assert os.environ.get("HF_HUB_OFFLINE") is None


def test_refuses_a_checkpoint_that_fails_the_loading_checks(tmp_path):
    out = make_output(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}  # a stale source config beside NVFP4 weights
    (out / "config.json").write_text(json.dumps(cfg))
    api = FakeApi()
    with pytest.raises(ValueError, match="fails .* engine loading check.*stale-quant-config.*--no-check"):
        hub.push_to_hub(out, "me/model", api=api)
    assert api.calls == []
    hub.push_to_hub(out, "me/model", api=api, check=False)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
