"""Worker slots of convert: --workers shards in flight on the CPU or on each GPU, GPUs interleaved."""

from __future__ import annotations

import pytest
import torch

from dsquant.convert.pipeline import GPU_WORKERS, _devices


def test_cpu_defaults_to_one_worker():
    assert _devices("cpu", None) == [torch.device("cpu")]
    assert _devices("cpu", 3) == [torch.device("cpu")] * 3


def test_gpus_get_workers_each_interleaved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert _devices("cuda", None) == gpus * GPU_WORKERS  # shard i goes to slot i % len: GPUs alternate
    assert _devices("cuda", 1) == gpus
    assert _devices("cuda:1", None) == [torch.device("cuda", 1)] * GPU_WORKERS
    with pytest.raises(ValueError, match="--workers 0: must be at least 1"):
        _devices("cuda", 0)
