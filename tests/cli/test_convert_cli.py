"""`dsquant convert` from the command line: every bad input gives one clear line naming the file or tensor,
a non-zero exit and no output that looks complete; plus --dry-run, --json and the success line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.cli import app

runner = CliRunner()
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-src")
    return {"bf16": make_synthetic_checkpoint(root / "bf16", n_routed_experts=2),
            "fp8": make_synthetic_checkpoint(root / "fp8", source="fp8", n_routed_experts=2)}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _out(result) -> str:
    return result.output  # stdout and stderr together, as a terminal shows them


def _index(src: Path) -> dict:
    return json.loads((src / INDEX).read_text())


def _shard_of(src: Path, name: str) -> Path:
    return src / _index(src)["weight_map"][name]


def _looks_complete(dst: Path) -> bool:
    return any((dst / f).exists() for f in (INDEX, "config.json", "dsquant_recipe.json", "README.md"))


def _break_missing_shard(src):
    _shard_of(src, "lm_head.weight").unlink()
    return "missing"


def _break_truncated(src):
    path = _shard_of(src, "lm_head.weight")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "truncated"


def _break_header_length(src):
    path = _shard_of(src, "lm_head.weight")
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    return "corrupt safetensors header"


def _break_header_json(src):
    path = _shard_of(src, "lm_head.weight")
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    return "corrupt safetensors header"


def _index_entry(target: str):
    def brk(src):
        index = _index(src)
        index["weight_map"]["lm_head.weight"] = target
        (src / INDEX).write_text(json.dumps(index))
        return "outside the checkpoint folder"
    return brk


def _break_no_config(src):
    (src / "config.json").unlink()
    return "config.json: missing"


def _break_not_deepseek(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (src / "config.json").write_text(json.dumps(cfg))
    return "LlamaForCausalLM"


def _break_fp8_scale(src):
    index = _index(src)
    del index["weight_map"]["model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"]
    (src / INDEX).write_text(json.dumps(index))
    return "experts.1.down_proj.weight' has no model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"


def _break_nan(src):
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    path = _shard_of(src, name)
    tensors = load_file(path)
    tensors[name][3, 7] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return "experts.1.up_proj.weight: holds 1 NaN"


def _break_pickle_only(src):
    for p in list(src.glob("*.safetensors")) + [src / INDEX]:
        p.unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return "not a safetensors checkpoint"


def _break_already_quantized(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (src / "config.json").write_text(json.dumps(cfg))
    return "already quantized"


BAD_SOURCES = {
    "missing-shard": ("bf16", _break_missing_shard),
    "truncated-shard": ("bf16", _break_truncated),
    "corrupt-header-length": ("bf16", _break_header_length),
    "corrupt-header-json": ("bf16", _break_header_json),
    "index-dotdot": ("bf16", _index_entry("../x.safetensors")),
    "index-absolute": ("bf16", _index_entry("/etc/passwd")),
    "no-config": ("bf16", _break_no_config),
    "not-deepseek": ("bf16", _break_not_deepseek),
    "fp8-without-scale": ("fp8", _break_fp8_scale),
    "nan-weight": ("bf16", _break_nan),
    "pickle-only": ("bf16", _break_pickle_only),
    "already-quantized": ("bf16", _break_already_quantized),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_one_clear_line_and_no_complete_output(base, tmp_path, case):
    kind, brk = BAD_SOURCES[case]
    src = _copy(base[kind], tmp_path)
    expected = brk(src)
    dst = tmp_path / "dst"
    result = runner.invoke(app, ["convert", str(src), str(dst), "--recipe", "nvfp4"])
    text = _out(result)
    assert result.exit_code == 1, text
    assert expected in text and text.count("error:") == 1 and "Traceback" not in text, text
    assert not _looks_complete(dst), f"{case}: left output that looks complete"


def test_shape_the_format_cannot_hold(tmp_path):
    # moe_intermediate_size 136 = 8.5 NVFP4 blocks: down_proj's input dim cannot be split into groups of 16.
    src = make_synthetic_checkpoint(tmp_path / "src", n_routed_experts=2, moe_intermediate_size=136)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "dst"), "--recipe", "nvfp4"])
    assert result.exit_code == 1
    assert "down_proj.weight' has 136 input columns, not a multiple of 16" in _out(result)
    assert not (tmp_path / "dst").exists()


def test_unrelated_non_empty_dst_is_refused(base, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(dst), "--recipe", "int8"])
    assert result.exit_code == 1 and "not empty and is not a dsquant output" in _out(result)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]


def test_finished_dst_is_refused(base, tmp_path):
    dst = tmp_path / "dst"
    assert runner.invoke(app, ["convert", str(base["bf16"]), str(dst), "-r", "int8"]).exit_code == 0
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(dst), "-r", "int8"])
    assert result.exit_code == 1 and "already holds a finished dsquant conversion" in _out(result)


def test_read_only_dst(base, tmp_path, monkeypatch):
    import dsquant.convert.pipeline as conv

    # Tests may run as root, for whom chmod does not stop writes: simulate what os.access reports on a
    # read-only mount, and use a path the kernel refuses to create for the "cannot create" case.
    monkeypatch.setattr(conv.os, "access", lambda *a, **k: False)
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(tmp_path / "ro"), "-r", "int8"])
    assert result.exit_code == 1 and "destination folder is not writable" in _out(result)
    monkeypatch.undo()
    result = runner.invoke(app, ["convert", str(base["bf16"]), "/sys/dsquant-test-out", "-r", "int8"])
    assert result.exit_code == 1 and "cannot create the destination folder" in _out(result)


def test_enospc_is_one_line_naming_the_shard(base, tmp_path, monkeypatch):
    import errno

    import dsquant.checkpoint.writer as w

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(w, "open", lambda p, m="r", *a, **k: Full(open(p, m, *a, **k)), raising=False)
    dst = tmp_path / "dst"
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(dst), "-r", "int8"])
    text = _out(result)
    assert result.exit_code == 1 and "no space left on the device while writing" in text and "model-00001" in text
    assert not _looks_complete(dst) and not list(dst.glob(".*.partial"))


@pytest.mark.parametrize("args,message", [
    (["-r", "no-such-recipe"], "unknown recipe 'no-such-recipe'; shipped recipes:"),
    (["-r", "int8", "--format", "modelopt"], "cannot be written as 'modelopt'; it supports ['compressed-tensors']"),
    (["--format", "gguf"], "--format 'gguf': choose auto"),
    (["--max-shard-size", "lots"], "is not a size like 5GB"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--device", "tpu"], "use cpu, cuda or cuda:N"),
])
def test_bad_options(base, tmp_path, args, message):
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(tmp_path / "dst"), *args])
    assert result.exit_code != 0 and message in _out(result), _out(result)
    assert not (tmp_path / "dst").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(base, tmp_path):
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(tmp_path / "dst"), "--device", "cuda"])
    assert result.exit_code == 1 and "CUDA is not available" in _out(result)


def test_dry_run_prints_the_plan_and_writes_nothing(base, tmp_path):
    dst = tmp_path / "dst"
    result = runner.invoke(app, ["convert", str(base["fp8"]), str(dst), "-r", "nvfp4", "--dry-run"])
    assert result.exit_code == 0, _out(result)
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["tensor", "pattern", "rule"]
    assert any(ln.startswith("model.layers.*.mlp.experts.*.gate_proj") and " nvfp4 " in ln for ln in lines)
    assert any(ln.startswith("lm_head") and " keep " in ln for ln in lines)
    assert "plan validated, nothing written" in lines[-1] and not dst.exists()
    as_json = runner.invoke(app, ["convert", str(base["fp8"]), str(dst), "-r", "nvfp4", "--dry-run", "--json"])
    plan = json.loads(as_json.output)
    assert plan["dry_run"] and plan["convention"] == "modelopt" and plan["source_dtype"] == "fp8"
    assert sum(r["count"] for r in plan["plan"] if r["format"] == "nvfp4") == plan["tensors"]["nvfp4"]


def test_convert_json_summary_and_default_dst(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["convert", str(base["fp8"]), "-r", "fp8-block", "--json"])
    assert result.exit_code == 0, _out(result)
    summary = json.loads(result.output)
    assert Path(summary["dst"]) == tmp_path / "fp8-fp8-block"  # ./<model-name>-<recipe>
    assert summary["bytes_in"] > 0 and summary["bytes_out"] > 0 and summary["gb_per_s"] > 0
    assert summary["tensors"]["fp8-block"] > 0 and summary["convention"] == "deepseek"
    assert (tmp_path / "fp8-fp8-block" / "dsquant_recipe.json").is_file()


def test_success_line_and_resume_message(base, tmp_path):
    dst = tmp_path / "dst"
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(dst), "-r", "mxfp4"])
    assert result.exit_code == 0, _out(result)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"converted {base['bf16']} -> {dst} (mxfp4, compressed-tensors):")
    assert "ratio" in line and "GB/s" in line
    (dst / ".dsquant-manifest.json").write_text(json.dumps({"fingerprint": "x", "created": "y", "shards": {}}))
    (dst / "dsquant_recipe.json").unlink()
    result = runner.invoke(app, ["convert", str(base["bf16"]), str(dst), "-r", "mxfp4"])
    assert result.exit_code == 1 and "run the same command with --resume" in _out(result)


def test_help_explains_the_options():
    result = runner.invoke(app, ["convert", "--help"])
    assert result.exit_code == 0
    for option in ("--recipe", "--format", "--device", "--workers", "--max-shard-size", "--resume", "--dry-run",
                   "--json", "--push-to-hub"):
        assert option in result.output, option


def test_deepseek_v4_refused_recipe_and_exact_blocks_line(tmp_path):
    from dsquant.checkpoint.synth_v4 import make_synthetic_v4_checkpoint

    src = make_synthetic_v4_checkpoint(tmp_path / "v4", variant="flash")
    refused = runner.invoke(app, ["convert", str(src), str(tmp_path / "int8"), "--recipe", "int8"])
    text = _out(refused)
    assert refused.exit_code == 1 and text.count("error:") == 1 and "refused for DeepSeek-V4" in text, text
    assert not (tmp_path / "int8").exists()
    done = runner.invoke(app, ["convert", str(src), str(tmp_path / "fp8"), "--recipe", "fp8-block"])
    assert done.exit_code == 0, _out(done)
    record = json.loads((tmp_path / "fp8" / "dsquant_recipe.json").read_text())["results"]
    assert (f"experts: {record['expert_blocks_exact']:,} of {record['expert_blocks']:,} 32-element blocks kept their "
            "values") in _out(done)
