"""summarize_checkpoint on hand-made checkpoints of every convention, on converter outputs, and on broken ones."""

from __future__ import annotations

import json
import logging

import pytest

from dsquant.check import check_checkpoint
from dsquant.checkpoint.index import TensorInfo
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.survey import survey
from dsquant.inspect import block_tp_limit, format_summary, summarize_checkpoint
from tests.check.ckpt_factory import build

# kind -> (convention, {group: expected dominant stored format})
EXPECTED = {
    "bf16": ("unquantized", {"routed experts": "bf16", "attention": "bf16"}),
    "deepseek-fp8": ("deepseek-fp8", {"routed experts": "fp8-block", "attention": "fp8-block", "router": "bf16"}),
    "modelopt": ("modelopt", {"routed experts": "nvfp4", "dense MLP": "nvfp4", "attention": "bf16"}),
    "ct-nvfp4": ("compressed-tensors", {"shared experts": "nvfp4", "attention": "bf16"}),
    "ct-mxfp4": ("compressed-tensors", {"routed experts": "mxfp4", "lm_head": "bf16"}),
    "ct-int8": ("compressed-tensors", {"routed experts": "int8-channel", "embeddings": "bf16"}),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_summary_of_each_convention(tmp_path, kind):
    ck = build(kind)
    s = summarize_checkpoint(ck.write(tmp_path / "c"))
    convention, groups = EXPECTED[kind]
    assert s["convention"] == convention
    by_group = {g["group"]: g for g in s["groups"]}
    for group, fmt in groups.items():
        assert list(by_group[group]["formats"]) == [fmt], (group, by_group[group])
    # bytes and counts come from the headers; compare with the tensors the fixture wrote
    assert s["tensors"] == len(ck.tensors)
    assert s["bytes"] == sum(t.numel() * t.element_size() for t in ck.tensors.values())
    assert sum(g["bytes"] for g in s["groups"]) == s["bytes"]
    assert s["architecture"]["architecture"] == "DeepseekV3ForCausalLM"
    assert s["architecture"]["experts_stored"] == 4 and s["architecture"]["layers_stored"] == 3
    assert s["consistency"]["ok"] and s["consistency"]["problems"] == []
    assert s["consistency"]["declared_total_size"] == s["bytes"]
    json.dumps(s)  # JSON-ready


def test_summary_flags_index_shard_disagreement(tmp_path):
    path = build("modelopt").write(tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    s = summarize_checkpoint(path)
    assert not s["consistency"]["ok"]
    assert any("model.layers.0.mlp.extra.weight" in p for p in s["consistency"]["problems"])
    assert "DISAGREE" in format_summary(s)


def test_single_file_checkpoint_without_index(tmp_path):
    s = summarize_checkpoint(build("bf16").write(tmp_path / "c", num_shards=1, index=False))
    assert s["shards"] == 1 and not s["consistency"]["index"] and s["consistency"]["ok"]
    assert "single file, no index" in format_summary(s)


def test_table_lists_every_group(tmp_path):
    s = summarize_checkpoint(build("modelopt").write(tmp_path / "c"))
    text = format_summary(s)
    for g in s["groups"]:
        assert g["group"] in text
    assert "nvfp4 x12" in text  # 4 experts x 3 projections
    assert "index, config and shards agree" in text


@pytest.mark.parametrize("recipe,convention,group_formats", [
    ("nvfp4", "modelopt", {"routed experts": "nvfp4", "attention": "bf16"}),
    ("mxfp4", "compressed-tensors", {"routed experts": "mxfp4"}),
    ("fp8-block", "deepseek", {"attention": "fp8-block"}),
])
def test_converter_outputs_inspect_and_check_clean(tmp_path, recipe, convention, group_formats):
    convert = pytest.importorskip("dsquant.convert").convert
    synth = pytest.importorskip("dsquant.checkpoint.synth").make_synthetic_checkpoint
    logging.disable(logging.WARNING)
    try:
        src = synth(tmp_path / "src", variant="v3", source="fp8", num_shards=2)
        convert(src, tmp_path / "out", recipe, convention=convention, progress=False)
    finally:
        logging.disable(logging.NOTSET)
    s = summarize_checkpoint(tmp_path / "out")
    by_group = {g["group"]: g for g in s["groups"]}
    for group, fmt in group_formats.items():
        assert list(by_group[group]["formats"])[0] == fmt
    assert s["consistency"]["ok"]
    assert check_checkpoint(tmp_path / "out") == []
    assert check_checkpoint(src) == []


def _header_only_view(tmp_path, shapes: dict[str, tuple[int, int]]) -> Checkpoint:
    """A view over headers alone: fp8 weights with block scales, at real DeepSeek shapes."""
    view = Checkpoint.blank(tmp_path, config={"quantization_config": {"weight_block_size": [128, 128]}})
    for module, (n, k) in shapes.items():
        view.infos[module + ".weight"] = TensorInfo(module + ".weight", "x", "F8_E4M3", (n, k), 0, 0)
        scale = (-(-n // 128), -(-k // 128))
        view.infos[module + ".weight_scale_inv"] = TensorInfo(module + ".weight_scale_inv", "x", "F32", scale, 0, 0)
    return view


def test_block_tp_limit_at_deepseek_shapes(tmp_path):
    p = "model.layers.3."
    v3 = {p + "self_attn.q_a_proj": (1536, 7168), p + "self_attn.kv_a_proj_with_mqa": (576, 7168),
          p + "self_attn.q_b_proj": (24576, 1536), p + "self_attn.kv_b_proj": (32768, 512),
          p + "self_attn.o_proj": (7168, 16384), p + "mlp.experts.0.gate_proj": (2048, 7168),
          p + "mlp.experts.0.down_proj": (7168, 2048)}
    assert block_tp_limit(_header_only_view(tmp_path, v3)) == {"max_tp": 16, "block": 128, "limited_by": None}
    # V2-Lite: moe_intermediate_size 1408 = 11 x 128, so no TP > 1 keeps whole blocks (EP is the way out)
    lite = {p + "mlp.experts.0.gate_proj": (1408, 2048), p + "mlp.experts.0.down_proj": (2048, 1408)}
    got = block_tp_limit(_header_only_view(tmp_path, lite))
    assert got["max_tp"] == 1 and got["limited_by"] in lite
    text = format_summary(summarize_checkpoint(build("deepseek-fp8").write(tmp_path / "c")))
    assert "shard up to TP 1 (TP 2 would cut" in text
    assert block_tp_limit(_header_only_view(tmp_path, {})) is None


class FakeHub:
    """Serves a local checkpoint folder the way HfApi does: file list, JSON downloads, header metadata."""

    def __init__(self, folder):
        self.folder, self.downloaded = folder, []

    def list_repo_files(self, repo_id, revision=None):
        return sorted(p.name for p in self.folder.iterdir())

    def hf_hub_download(self, repo_id, filename, revision=None):
        self.downloaded.append(filename)
        return str(self.folder / filename)

    def get_safetensors_metadata(self, repo_id, revision=None):
        from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
        from huggingface_hub.utils import TensorInfo as HubTensorInfo

        from dsquant.checkpoint.index import read_raw_header

        files = {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            header, _, _ = read_raw_header(shard)
            files[shard.name] = SafetensorsFileMetadata(metadata={}, tensors={
                n: HubTensorInfo(dtype=m["dtype"], shape=m["shape"], data_offsets=tuple(m["data_offsets"]))
                for n, m in header.items()})
        weight_map = {n: f for f, meta in files.items() for n in meta.tensors}
        return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map,
                                       files_metadata=files)


def test_remote_checkpoint_is_read_from_headers_only(tmp_path):
    from dsquant.check import check_view
    from dsquant.inspect import summarize_view

    path = build("modelopt").write(tmp_path / "c")
    local = summarize_checkpoint(path)
    hub = FakeHub(path)
    view = survey("hf://nvidia/Tiny-FP4@v1", api=hub)
    remote = summarize_view(view)
    assert remote["groups"] == local["groups"] and remote["convention"] == "modelopt" and remote["consistency"]["ok"]
    assert not any(f.endswith(".safetensors") for f in hub.downloaded)  # only JSON files were fetched
    findings = check_view(view)
    assert [f.rule for f in findings] == ["values-not-read"] and findings[0].severity == "warning"


def test_remote_checkpoint_rules_that_need_no_values_still_fire(tmp_path):
    from dsquant.check import check_view

    ck = build("modelopt")
    ck.hf_quant_config["quantization"]["exclude_modules"] = ck.config["quantization_config"]["ignore"] = \
        ck.hf_quant_config["quantization"]["exclude_modules"] + ["mlp.gate"]
    path = ck.write(tmp_path / "c")
    (path / "model-00002-of-00002.safetensors").rename(path / "elsewhere.bin")
    rules = {(f.rule, f.severity) for f in check_view(survey("hf://org/name", api=FakeHub(path)))}
    assert {("exclude-overmatch", "error"), ("index", "error")} <= rules


def test_remote_errors_are_named(monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.errors import RepositoryNotFoundError


    class Missing(FakeHub):
        def list_repo_files(self, repo_id, revision=None):
            raise RepositoryNotFoundError("nope", response=SimpleNamespace(headers={}, status_code=404, request=None))

    with pytest.raises(ValueError, match="repository org/absent not found"):
        survey("hf://org/absent", api=Missing(None))
    with pytest.raises(ValueError, match="expected hf://ORG/NAME"):
        survey("hf://just-a-name@")
