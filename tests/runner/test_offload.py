"""Layer streaming: the same logits as the resident model, and peak resident weights of one layer."""

from __future__ import annotations

import pytest
import torch

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.devices import resolve_devices
from dsquant.runner.load import ModelCheckpoint, load_model
from dsquant.runner.offload import StreamStats, resident_logits, stream_logits


def test_streamed_logits_equal_resident_and_memory_follows_one_layer(tmp_path):
    ckpt = make_synthetic_checkpoint(tmp_path / "v3", variant="v3", source="fp8", num_shards=2,
                                     num_hidden_layers=6, first_k_dense_replace=1)  # fmt: skip
    reader = ModelCheckpoint(ckpt)
    layer_bytes = [reader.layer_nbytes(i) for i in range(reader.args.n_layers)]
    windows = torch.randint(0, reader.args.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    stats = StreamStats()
    streamed = torch.cat([lg for _, lg in stream_logits(ckpt, windows, batch_size=2, stats=stats)])
    model, _ = load_model(ckpt)
    resident = torch.cat([lg for _, lg in resident_logits(model, windows, batch_size=2)])
    assert torch.equal(streamed, resident), "streaming must not change the arithmetic"

    assert [s["bytes"] for s in stats.layers] == layer_bytes  # every layer was read, once
    bound = stats.non_layer_bytes + max(layer_bytes)
    model_bytes = stats.non_layer_bytes + sum(layer_bytes)
    # Live weight tensors (tracked by weak reference) never exceed the non-layer weights plus the
    # largest layer; keeping even one previous layer alive would break this bound.
    assert stats.peak_resident_bytes <= bound, (stats.peak_resident_bytes, bound)
    assert stats.peak_resident_bytes < model_bytes - min(layer_bytes) + 1


def test_windows_spread_over_devices_give_single_device_logits(tmp_path):
    # Two devices (both the host here; GPUs on a multi-GPU machine) share the batches: each batch must
    # come out exactly as on one device, in window order, with every device streaming every layer.
    ckpt = make_synthetic_checkpoint(tmp_path / "v3", variant="v3", source="fp8", num_shards=2,
                                     num_hidden_layers=3, first_k_dense_replace=1)  # fmt: skip
    vocab = ModelCheckpoint(ckpt).args.vocab_size
    windows = torch.randint(0, vocab, (5, 16), generator=torch.Generator().manual_seed(1))
    one = list(stream_logits(ckpt, windows, batch_size=2))
    stats = StreamStats()
    seen = []
    two = list(stream_logits(ckpt, windows, batch_size=2, devices=["cpu", "cpu"], stats=stats,
                             on_layer=lambda layer, block: seen.append(layer)))  # fmt: skip
    assert [i for i, _ in two] == [i for i, _ in one] == [0, 2, 4]
    for (_, a), (_, b) in zip(one, two):
        assert torch.equal(a, b)
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]  # each device's copy of each layer
    assert len(stats.layers) == 3


def test_several_devices_read_each_layer_once(tmp_path, monkeypatch):
    ckpt = make_synthetic_checkpoint(tmp_path / "v3", variant="v3", source="fp8", num_shards=2,
                                     num_hidden_layers=3, first_k_dense_replace=1)  # fmt: skip
    reads: dict[str, int] = {}
    get = ModelCheckpoint.get

    def counting_get(self, name):
        reads[name] = reads.get(name, 0) + 1
        return get(self, name)

    monkeypatch.setattr(ModelCheckpoint, "get", counting_get)
    windows = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    for _ in stream_logits(ckpt, windows, batch_size=1, devices=["cpu", "cpu", "cpu"]):
        pass
    layer_reads = {k: n for k, n in reads.items() if k.startswith("model.layers.")}
    assert layer_reads and set(layer_reads.values()) == {1}, layer_reads  # read on the host once, for all devices


def test_resolve_devices_errors():
    assert resolve_devices("cpu") == ["cpu"]
    with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
        resolve_devices("tpu")
    with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
        resolve_devices("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_devices("cuda")


def test_resolve_devices_on_a_multi_gpu_machine(monkeypatch):
    # "cuda" means every visible GPU (convert: one worker each; eval --offload layer: windows spread over them)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("cuda") == ["cuda:0", "cuda:1"]
    assert resolve_devices("cuda:1") == ["cuda:1"]
    with pytest.raises(ValueError, match=r"--device cuda:2: only 2 GPU\(s\) visible"):
        resolve_devices("cuda:2")


def test_evaluate_over_two_devices_equals_one(tmp_path):
    from dsquant.demo import demo_model_dir
    from dsquant.runner.evaluate import evaluate, load_text

    text, info = load_text()
    kw = dict(text=text[:6000], text_info=info, seq_len=64, max_tokens=640, offload="layer", batch_size=2)
    one = evaluate(demo_model_dir(), **kw)
    two = evaluate(demo_model_dir(), devices=["cpu", "cpu"], **kw)
    assert two["results"] == one["results"]
    assert two["protocol"]["device"] == "cpu,cpu"


def test_interleaved_logit_generators_leave_gradients_on(tmp_path):
    """evaluate() interleaves the base's and each conversion's generators; grad mode held across a yield leaked
    into the caller and, closed out of order, turned gradients off for the rest of the process."""
    ckpt = make_synthetic_checkpoint(tmp_path / "v3", variant="v3", source="fp8", num_shards=1)
    model, _ = load_model(ckpt)
    windows = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    a, b = resident_logits(model, windows, batch_size=2), stream_logits(ckpt, windows, batch_size=2)
    next(a)
    next(b)
    assert torch.is_grad_enabled()  # between batches, the caller's mode
    del a  # closed first, as a generator dropped before the other one
    del b
    assert torch.is_grad_enabled()
