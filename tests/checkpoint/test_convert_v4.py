"""`convert` on DeepSeek-V4 (official layout): fp8-block, nvfp4 and mxfp4 recipes on the Flash, 0731 and Base
layouts, the refused recipes, and what the outputs hold, read back by transformers 5.25 and by inspect --check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsquant.check import check_checkpoint
from dsquant.checkpoint.names_v4 import scale_name
from dsquant.checkpoint.reader import Checkpoint
from dsquant.convert import convert
from dsquant.formats.mxfp4 import quantize_mxfp4
from dsquant.formats.ondisk import read_quantized
from dsquant.recipe_files import recipes_dir
from tests.checkpoint.v4_transformers import load_official

E8M0 = torch.float8_e8m0fnu
EXPERT = ".ffn.experts."
IDS = torch.tensor([[0, 5, 9, 77, 3, 100, 41, 200]])


@pytest.fixture(scope="module")
def converted(synth_v4, tmp_path_factory):
    """converted(variant, recipe) -> (source path, output path, summary), each made once."""
    cache = {}

    def get(variant: str, recipe: str):
        if (variant, recipe) not in cache:
            dst = tmp_path_factory.mktemp(f"v4-{variant}-{recipe}") / "out"
            summary = convert(synth_v4(variant), dst, recipe, max_shard_size="2MB", progress=False)
            cache[(variant, recipe)] = (synth_v4(variant), dst, summary)
        return cache[(variant, recipe)]

    return get


def _values(ck: Checkpoint, module: str) -> torch.Tensor:
    """A linear's values as dsquant reads the stored tensors (any V4 or ModelOpt layout), float32."""
    p = module + "."
    if p + "weight_scale_2" in ck:
        return read_quantized(module, ck, {"quant_method": "modelopt"}).dequantize(torch.float32)
    return read_quantized(module, ck, ck.quantization_config).dequantize(torch.float32)


def _errors(path) -> list:
    return [f for f in check_checkpoint(path) if f.severity == "error"]


def _recipe(path) -> dict:
    return json.loads((path / "dsquant_recipe.json").read_text())


# ------------------------------------------------------------------------------------------------ fp8-block


@pytest.mark.parametrize("variant", ["flash", "flash-0731"])
def test_fp8_block_layout_and_config(converted, variant):
    src, out, summary = converted(variant, "fp8-block")
    s, o = Checkpoint(src), Checkpoint(out)
    assert set(s.infos) == set(o.infos)
    for name, info in o.infos.items():
        if name.endswith(".scale"):
            assert info.dtype == torch.float32, name  # vLLM: float32 dense and expert scales beside FP8 experts
        if EXPERT in name and name.endswith(".weight"):
            assert info.dtype == torch.float8_e4m3fn and info.shape[1] == 2 * s.infos[name].shape[1], name
        elif not name.endswith(".scale"):
            assert o.raw(name) == s.raw(name), name  # everything else byte for byte
        elif EXPERT not in name:  # dense scales: E8M0 retyped to the same float32 values
            assert torch.equal(o.get(name), s.get(name).float()), name
    cfg = o.config
    assert cfg["expert_dtype"] == "fp8" and cfg["quantization_config"]["quant_method"] == "fp8"
    assert {k: v for k, v in cfg.items() if k != "expert_dtype"} == \
        {k: v for k, v in s.config.items() if k != "expert_dtype"}
    assert _errors(out) == []
    # every expert block of the synthetic source fits E4M3, and the record says so
    total = sum(o.infos[n].shape[0] * o.infos[n].shape[1] // 32 for n in o.infos
                if EXPERT in n and n.endswith(".weight"))
    assert summary.results == {"expert_blocks_exact": total, "expert_blocks": total, "max_expert_abs_error": 0.0}
    assert _recipe(out)["results"] == summary.results


@pytest.mark.parametrize("variant", ["flash", "flash-0731"])
def test_fp8_block_output_loads_in_transformers_with_the_source_logits(converted, variant):
    """transformers 5.25 dequantizes FP8 (float32 grids) on CPU; exact values give bit-equal parameters and logits,
    the draft (dropped by transformers) aside."""
    src, out, _ = converted(variant, "fp8-block")
    ref, _ = load_official(src)
    got, info = load_official(out)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    want = ref.state_dict()
    for name, value in got.state_dict().items():
        assert torch.equal(value, want[name]), name
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, ref(IDS).logits)


def test_fp8_block_counts_the_blocks_e4m3_cannot_hold(synth_v4, tmp_path):
    """A 32-block 20 binades below its neighbours underflows E4M3 in a 128x128 tile: the reported exact count is
    what comparing the dequantized output with the source gives, block by block."""
    src = tmp_path / "src"
    shutil.copytree(synth_v4("flash"), src)
    module = "layers.3.ffn.experts.1.w1"
    info = Checkpoint(src).infos[module + ".scale"]
    with open(src / info.file, "r+b") as f:
        f.seek(info.start)
        row = bytearray(f.read(info.shape[1]))
        row[0] -= 20
        f.seek(info.start)
        f.write(row)
    summary = convert(src, tmp_path / "out", "fp8-block", progress=False)
    s, o = Checkpoint(src), Checkpoint(tmp_path / "out")
    exact = total = 0
    worst = 0.0
    for name in o.infos:
        if EXPERT in name and name.endswith(".weight"):
            a, b = _values(s, name[:-7]), _values(o, name[:-7])
            same = (a == b).reshape(a.shape[0], -1, 32).all(dim=-1)
            exact, total = exact + int(same.sum()), total + same.numel()
            worst = max(worst, float((a - b).abs().max()))
    assert 0 < exact < total
    assert summary.results == {"expert_blocks_exact": exact, "expert_blocks": total, "max_expert_abs_error": worst}


# ------------------------------------------------------------------------------------------------ nvfp4


@pytest.mark.parametrize("variant", ["flash", "flash-0731"])
def test_nvfp4_is_nvidias_hybrid_layout(converted, variant):
    src, out, summary = converted(variant, "nvfp4")
    s, o = Checkpoint(src), Checkpoint(out)
    dspark = variant == "flash-0731"
    for name in s.infos:  # every non-expert tensor, and the kept DSpark experts, byte for byte
        if EXPERT not in name or (dspark and name.startswith("mtp.")):
            assert o.raw(name) == s.raw(name), name
    nvfp4 = sorted({n.rsplit(".", 1)[0] for n in o.infos if n.endswith(".weight_scale_2")})
    expected = sorted({n.rsplit(".", 1)[0] for n in s.infos if EXPERT in n and n.endswith(".weight")
                       and not (dspark and n.startswith("mtp."))})
    assert nvfp4 == expected
    for module in nvfp4:
        p = module + "."
        assert (o.infos[p + "weight"].dtype, o.infos[p + "weight_scale"].dtype) == (torch.uint8, torch.float8_e4m3fn)
        assert o.infos[p + "weight_scale_2"].shape == () and o.infos[p + "input_scale"].shape == ()
        assert p + "scale" not in o.infos
        assert torch.equal(_values(o, module), _values(s, module)), module  # the closed form keeps every value
        if module.endswith(".w1"):  # w1 and w3 share both global scales (one fused GEMM1)
            w3 = module[:-2] + "w3."
            assert o.raw(p + "weight_scale_2") == o.raw(w3 + "weight_scale_2")
            assert o.raw(p + "input_scale") == o.raw(w3 + "input_scale")
        assert float(o.get(p + "input_scale")) == 1.0  # the documented default without calibration
    qc = o.config["quantization_config"]
    assert qc["moe_quant_algo"] == "NVFP4" and qc["quant_method"] == "fp8" and o.config["expert_dtype"] == "fp4"
    assert qc.get("ignore") == (["mtp.*"] if dspark else None)
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "MIXED_PRECISION" and hf["group_size"] == 16 and hf["kv_cache_quant_algo"] is None
    assert sorted(hf["quantized_layers"]) == nvfp4
    assert {"*.attn.*", "*.ffn.shared_experts.*", "embed.weight", "head.weight"} <= set(hf["exclude_modules"])
    assert _errors(out) == []
    assert summary.results["expert_blocks_exact"] == summary.results["expert_blocks"] > 0
    card = (out / "README.md").read_text()
    assert "uncalibrated default" in card


def test_nvfp4_from_base_fp8_experts(converted):
    """-Base experts are FP8: quantized to NVFP4 with the w1/w3 global scale; dense scales become E8M0 (vLLM expects
    E8M0 beside FP4-family experts), the same values."""
    src, out, _ = converted("flash-base", "nvfp4")
    s, o = Checkpoint(src), Checkpoint(out)
    w1, w3 = "layers.3.ffn.experts.2.w1", "layers.3.ffn.experts.2.w3"
    assert o.raw(w1 + ".weight_scale_2") == o.raw(w3 + ".weight_scale_2")
    amax = max(float(_values(s, w1).abs().max()), float(_values(s, w3).abs().max()))
    assert float(o.get(w1 + ".weight_scale_2")) == pytest.approx(amax / 2688, rel=1e-6)
    wq = "layers.0.attn.wq_a"
    assert o.infos[wq + ".scale"].dtype == E8M0 and o.raw(wq + ".weight") == s.raw(wq + ".weight")
    assert torch.equal(o.get(wq + ".scale").float(), s.get(wq + ".scale"))
    assert _errors(out) == []


# ------------------------------------------------------------------------------------------------ mxfp4


def test_mxfp4_from_base(converted):
    src, out, _ = converted("flash-base", "mxfp4")
    s, o = Checkpoint(src), Checkpoint(out)
    for name, info in s.infos.items():
        if EXPERT in name and name.endswith(".weight"):
            module = name[:-7]
            assert (o.infos[name].dtype, o.infos[module + ".scale"].dtype) == (torch.int8, E8M0)
            packed, scale = quantize_mxfp4(_values(s, module))  # the format reference on the exact source values
            assert torch.equal(o.get(name).view(torch.uint8), packed)
            assert torch.equal(o.get(module + ".scale").view(torch.uint8), scale)
        elif name.endswith(".scale") and EXPERT not in name:
            assert o.infos[name].dtype == E8M0 and torch.equal(o.get(name).float(), s.get(name)), name
        elif not name.endswith(".scale"):
            assert o.raw(name) == s.raw(name), name
    assert o.config["expert_dtype"] == "fp4" and o.config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert _errors(out) == []


def test_mxfp4_requantizes_dense_weights_whose_float32_scale_is_no_power_of_two(synth_v4, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_v4("flash-base"), src)
    module = "layers.1.attn.wo_b"
    info = Checkpoint(src).infos[module + ".scale"]
    grid = Checkpoint(src).get(module + ".scale").clone()
    grid[0, 0] *= 1.5  # the block's values change too, which is what the source now says
    with open(src / info.file, "r+b") as f:
        f.seek(info.start)
        f.write(grid.numpy().tobytes())
    summary = convert(src, tmp_path / "out", "mxfp4", progress=False)
    o = Checkpoint(tmp_path / "out")
    assert summary.results.get("dense_requantized") == 1
    assert o.infos[module + ".scale"].dtype == E8M0
    want = _values(Checkpoint(src), module)
    got = _values(o, module)
    assert torch.equal(got[128:], want[128:])  # the other tiles are kept exactly
    assert float((got - want).abs().max()) <= float(want[:128, :128].abs().max()) / 16
    assert _errors(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize("recipe,message", [
    ("int8", "recipe 'int8' is refused for DeepSeek-V4: no engine serves DeepSeek-V4 as INT8"),
    ("fp8-block-ue8m0", "needs float32 dense scales"),
    ("nvfp4-experts-only", None),
])
def test_recipes_engines_cannot_serve_are_refused_before_any_work(synth_v4, tmp_path, recipe, message):
    dst = tmp_path / "out"
    if message is None:  # maps onto the V4 NVFP4 recipe
        assert convert(synth_v4("flash"), dst, recipe, dry_run=True).recipe == "v4-nvfp4"
        return
    with pytest.raises(ValueError, match=message) as e:
        convert(synth_v4("flash"), dst, recipe, progress=False)
    assert "vllm/models/deepseek_v4/quant_config.py" in str(e.value) or recipe != "int8"
    assert not dst.exists()


def test_v3_recipe_files_and_formats_are_refused_on_v4_and_v4_recipes_on_v3(synth_v4, synth, tmp_path):
    with pytest.raises(ValueError, match="is not a DeepSeek-V4 recipe"):
        convert(synth_v4("flash"), tmp_path / "a", str(recipes_dir() / "nvfp4.toml"), dry_run=True)
    with pytest.raises(ValueError, match="--format modelopt: recipe v4-nvfp4 writes DeepSeek-V4 in the official"):
        convert(synth_v4("flash"), tmp_path / "b", "nvfp4", convention="modelopt", dry_run=True)
    for convention in ("auto", "compressed-tensors"):
        with pytest.raises(ValueError, match="not a DeepSeek-V4 checkpoint"):
            convert(synth("v3", "bf16"), tmp_path / "c", "v4-nvfp4", convention=convention, dry_run=True)


# ------------------------------------------------------------------------------------------------ streaming


# ------------------------------------------------------------------------------------------------ transformers' save


def test_transformers_save_is_written_back_in_the_official_names(synth_v4, tmp_path):
    """save_pretrained's mixed namespace (written by transformers 5.25 itself) comes back under exactly the official
    names of the source it was loaded from, each tensor with the values transformers held; config.json regains
    compress_ratios and num_hash_layers; other recipes refuse the dequantized source with the fix to run."""
    from tests.checkpoint.v4_transformers import save_transformers_namespace

    src = synth_v4("flash")
    saved = save_transformers_namespace(src, tmp_path / "tf")
    with pytest.raises(ValueError, match="--recipe v4-official-names"):
        convert(saved, tmp_path / "refused", "nvfp4", progress=False)
    out = tmp_path / "out"
    convert(saved, out, "v4-official-names", progress=False)
    s, t, o = Checkpoint(src), Checkpoint(saved), Checkpoint(out)
    official = {n for n in s.infos if not n.startswith("mtp.") and not n.endswith(".scale")}
    assert set(o.infos) == official and len(t.infos) == len(official)
    for name in official:
        quantized = name.endswith(".weight") and scale_name(name) in s.infos
        want, got = (_values(s, name[:-7]) if quantized else s.get(name)), o.get(name)
        # transformers rounds dequantized values to BF16 once and widens norms to float32, exactly
        assert torch.equal(got.to(want.dtype), want.to(got.dtype).to(want.dtype)), name
    n = s.config["num_hidden_layers"]
    assert o.config["compress_ratios"] == s.config["compress_ratios"][:n]
    assert o.config["num_hash_layers"] == s.config["num_hash_layers"] and "quantization_config" not in o.config
    assert _errors(out) == []
    model, info = load_official(out)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())



def test_dry_run_plan_rows_per_layer_kind(synth_v4, tmp_path):
    """--dry-run on V4 lists one row per generalized official name: experts NVFP4, DSpark experts kept MXFP4 by the
    ignore entry, dense linears kept FP8; nothing written."""
    summary = convert(synth_v4("flash-0731"), tmp_path / "out", "nvfp4", dry_run=True)
    rows = {r["pattern"]: r for r in summary.plan}
    assert rows["layers.*.ffn.experts.*.w1"]["format"] == "nvfp4"
    assert rows["mtp.*.ffn.experts.*.w1"]["format"] == "mxfp4"
    assert rows["mtp.*.ffn.experts.*.w1"]["rule"] == "mtp.{dspark}.ffn.experts.*"
    assert rows["layers.*.attn.wq_a"]["format"] == "fp8-block" and rows["layers.*.attn.wq_a"]["count"] == 5
    assert not (tmp_path / "out").exists()
