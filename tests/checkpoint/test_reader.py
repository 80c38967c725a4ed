"""The one checkpoint reader: a strict open (convert, the runner) and a survey (inspect, check) read the same
headers into the same TensorInfo, refuse or report the same index entries, and find the same quantization config."""

from __future__ import annotations

import json

import pytest
import torch

from dsquant.checkpoint.index import INDEX_NAME, CheckpointError
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.survey import survey
from dsquant.runner.load import ModelCheckpoint
from tests.check.ckpt_factory import build


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_strict_open_and_survey_read_the_same_headers(tmp_path):
    ck = build("modelopt")
    path = ck.write(tmp_path / "c")
    strict, surveyed = Checkpoint(path), survey(path)
    assert strict.infos == surveyed.infos and len(strict.infos) == len(ck.tensors)
    assert strict.weight_map == surveyed.weight_map and strict.shard_files == sorted(surveyed.shard_files)
    assert surveyed.problems == []
    for name, t in ck.tensors.items():
        info = strict.infos[name]
        assert (info.dtype, info.shape, info.nbytes) == (t.dtype, tuple(t.shape), t.numel() * t.element_size())
        assert strict.raw(name) == bytes(_bytes(t).numpy())
        assert strict.read_tensor(name).dtype == t.dtype and torch.equal(_bytes(strict.read_tensor(name)), _bytes(t))
        if t.numel() == 1:
            assert strict.read_scalar(name) == float(t.float())


@pytest.mark.parametrize(
    "entry,why",
    [
        ("../x.safetensors", "points outside"),
        ("/etc/passwd", "points outside"),
        ("link.safetensors", "resolves outside"),
    ],
)
def test_index_entries_outside_the_folder_are_refused_or_reported(tmp_path, entry, why):
    path = build("bf16").write(tmp_path / "c")
    (tmp_path / "elsewhere.safetensors").write_bytes((path / "model-00001-of-00002.safetensors").read_bytes())
    (path / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    index = json.loads((path / INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = entry
    (path / INDEX_NAME).write_text(json.dumps(index))
    message = f"{path / INDEX_NAME}: entry {entry!r} {why} the checkpoint folder; refusing it"
    for strict in (Checkpoint, ModelCheckpoint):
        with pytest.raises(CheckpointError) as e:
            strict(path)
        assert str(e.value) == message
    assert [p.message for p in survey(path).problems if p.file == entry] == [message]


def test_quant_config_falls_back_to_hf_quant_config(tmp_path):
    ck = build("modelopt")
    declared = ck.config.pop("quantization_config")
    path = ck.write(tmp_path / "c")
    reader = ModelCheckpoint(path)
    assert reader.quantization_config is None
    assert reader.quant_config == {**ck.hf_quant_config["quantization"], "quant_method": "modelopt"}
    assert reader.quant_config["quant_algo"] == declared["quant_algo"]
    (path / "config.json").write_text(json.dumps({**ck.config, "quantization_config": declared}))
    assert ModelCheckpoint(path).quant_config == declared  # config.json's own comes first
    (path / "hf_quant_config.json").unlink()
    (path / "config.json").write_text(json.dumps(ck.config))
    assert ModelCheckpoint(path).quant_config == {}
