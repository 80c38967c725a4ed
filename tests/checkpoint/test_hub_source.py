"""hf:// checkpoint sources, offline: a hand-built cache serves hf://, a fake snapshot_download records calls."""

from __future__ import annotations

import fnmatch
import os
from types import SimpleNamespace

import pytest
from huggingface_hub import constants

import dsquant.checkpoint.hub_source as hub_source
from tests.check.ckpt_factory import build


def test_local_source_is_returned_as_is(tmp_path):
    assert hub_source.resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="not a directory"):
        hub_source.resolve_source(str(tmp_path / "missing"))


@pytest.mark.parametrize("spec", ["hf://", "hf://onlyname", "hf://a/b/c", "hf://a/b@", "hf://a/b@x@y", "hf:/a/b"])
def test_bad_hf_specs(spec):
    with pytest.raises(ValueError):
        hub_source.resolve_source(spec)


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
    assert hub_source.resolve_source("hf://deepseek-ai/Tiny") == snap
    assert hub_source.resolve_source("hf://deepseek-ai/Tiny@" + "a" * 40) == snap


def test_hf_source_cache_miss_offline(offline_cache):
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub_source.resolve_source("hf://deepseek-ai/NotCached")


def test_hf_source_incomplete_snapshot(tmp_path, offline_cache):
    src = build("bf16").write(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.name != "model-00002-of-00002.safetensors"}
    _populate_cache(offline_cache, "deepseek-ai/Partial", files)
    with pytest.raises(ValueError, match="1 shard\\(s\\) missing .*HF_HUB_OFFLINE"):
        hub_source.resolve_source("hf://deepseek-ai/Partial")


def test_hf_source_downloads_only_what_conversion_needs(tmp_path, monkeypatch):
    seen = {}

    def fake_snapshot_download(repo, **kw):
        seen.update(kw, repo=repo)
        return str(build("bf16").write(tmp_path / "snap"))

    monkeypatch.setattr(hub_source, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub_source, "check_reachable", lambda what: None)  # no request leaves the test
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_source.resolve_source("hf://org/name@dev")
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
    monkeypatch.setattr(hub_source, "check_reachable", lambda what: None)  # no request leaves the test
    for exc, text in ((RepositoryNotFoundError, "not found"), (RevisionNotFoundError, "revision 'r' not found")):
        monkeypatch.setattr(hub_source, "snapshot_download", raiser(exc))
        with pytest.raises(ValueError, match=text):
            hub_source.resolve_source("hf://org/name@r")
    assert os.environ.get("HF_HUB_OFFLINE") is None
