"""convert's CPU quantizers (cpuquant) are bit-identical to the format references (dsquant.formats): codes and
scales quantizer by quantizer on both CPU paths (the C extension's loops and the torch fallback), and whole
conversions (every recipe x every synthetic source kind, V4 included) file by file on the default path."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

import dsquant.convert.cpuquant as fast
from dsquant import formats
from dsquant.checkpoint.synth import SOURCES
from dsquant.checkpoint.synth_v4 import V4_VARIANTS
from dsquant.convert import convert, quantizers
from dsquant.formats.fp4 import pack_fp4, round_to_e2m1
from dsquant.recipe_files import recipes_dir
from tests.checkpoint.interrupt import output_tree


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test on the C loops (when the extension was built at install) and on the torch path."""
    if request.param == "native":
        if not fast.native.available():
            pytest.skip("the C extension dsquant.convert._native was not built here")
    else:
        monkeypatch.setattr(fast.native, "available", lambda: False)
    return request.param


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def test_e2m1_codes_match_reference_on_ties_and_random_bits(path):
    ties = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e30, 1e-45, 2.0, 4.0])
    up, down = torch.full_like(ties, 100.0), torch.full_like(ties, -100.0)
    near = torch.cat([ties, torch.nextafter(ties, up), torch.nextafter(ties, down)])
    x = torch.cat([near, -near, torch.tensor([-0.0]), torch.linspace(-8, 8, 40001)])
    assert torch.equal(fast.e2m1_codes(x), round_to_e2m1(x))
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int32, generator=gen).view(torch.float32)
    bits = bits[torch.isfinite(bits)]  # every finite float32 class: subnormals, huge, both zeros
    assert torch.equal(fast.e2m1_codes(bits), round_to_e2m1(bits))
    if path == "native":  # the C loop at unit scale (denominator 1.0 per pair) packs the same codes
        for v in (x, bits):
            v = v[: v.numel() // 2 * 2]
            assert torch.equal(fast.native.e2m1_pack(v, torch.ones(v.numel() // 2), 2), pack_fp4(round_to_e2m1(v)))


def _weights(n: int, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n * 7 + k)
    w = (0.02 * torch.exp(torch.randn(n, 1, generator=gen)) * torch.randn(n, k, generator=gen)).bfloat16().float()
    w[1, :32] = 0.0  # all-zero blocks
    w[2, 32:64] = -0.0
    w[3, 5] = 1e-30  # a value far below its block's scale
    w[4, :16] = torch.tensor([6.0, -5.0, 2.5, 0.25] * 4)  # exact E2M1 ties at unit scale
    return w


@pytest.mark.parametrize("n,k", [(256, 512), (384, 256)])
@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-block-ue8m0", "int8", "nvfp4", "nvfp4-global", "mxfp4-ocp",
                                 "mxfp4-ceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_quantizers_bit_identical(path, fmt, n, k, dtype):
    w = _weights(n, k).to(dtype)  # the weights are BF16 values, so both dtypes hold the same numbers
    calls = {
        "fp8-block": (fast.quantize_fp8_block, formats.quantize_fp8_block, {}),
        "fp8-block-ue8m0": (fast.quantize_fp8_block, formats.quantize_fp8_block, {"ue8m0": True}),
        "int8": (fast.quantize_int8_per_token, formats.quantize_int8_per_token, {}),
        "nvfp4": (fast.quantize_nvfp4, formats.quantize_nvfp4, {}),
        "nvfp4-global": (fast.quantize_nvfp4, formats.quantize_nvfp4, {"global_scale": torch.tensor(3e-6)}),
        "mxfp4-ocp": (fast.quantize_mxfp4, formats.quantize_mxfp4, {"scale_rule": "ocp"}),
        "mxfp4-ceil": (fast.quantize_mxfp4, formats.quantize_mxfp4, {"scale_rule": "ceil"}),
    }
    ours, ref, kwargs = calls[fmt]
    for a, b in zip(ours(w, **kwargs), ref(w, **kwargs)):
        assert a.dtype == b.dtype and a.shape == b.shape, fmt
        assert torch.equal(_bytes(a), _bytes(b)), f"{fmt} {n}x{k}: {int((_bytes(a) != _bytes(b)).sum())} differ"


def test_cpu_quantizers_ragged_shapes_fall_back_exactly(path):
    w = _weights(192, 256)  # 1.5 row blocks, as kv_a_proj_with_mqa
    for a, b in zip(fast.quantize_fp8_block(w), formats.quantize_fp8_block(w)):
        assert torch.equal(_bytes(a), _bytes(b))


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # cuda: the Triton set (the check runs before any launch)
@pytest.mark.parametrize("fn", ["fp8_block", "int8_rows", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_convert_quantizers_refuse_nan_inf_with_the_tensor_name(path, device, fn, bad):
    qz = quantizers.select_quantizers(torch.device(device))
    assert qz.kind == {"cpu": "cpu", "cuda": "triton"}[device]
    w = _weights(128, 256)
    w[7, 9] = bad
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.up_proj\.weight: holds"):
        getattr(qz, fn)(w, name="model.layers.3.mlp.up_proj.weight")


def test_int8_rounds_exact_ties_to_even(path):
    # amax 127 gives scale exactly 1.0, so these values are exact .5 ties: half-to-even gives 0, 2, 2, -2, 126.
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, 125.5, -0.5, 3.5] * 16)
    q, s = fast.quantize_int8_per_token(row.repeat(4, 1))
    ref_q, ref_s = formats.quantize_int8_per_token(row.repeat(4, 1))
    assert torch.equal(s, ref_s) and s[0, 0].item() == 1.0
    assert torch.equal(q, ref_q) and q[0, :8].tolist() == [127, 0, 2, 2, -2, 126, 0, 4]


def test_native_fp8_cast_matches_torch_on_ties_and_random_values(path):
    if path != "native":
        pytest.skip("the C cast only")
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (400_000,), generator=gen, dtype=torch.int32).view(torch.float32)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)].unique()
    mid = (codes[1:] + codes[:-1]) / 2  # exact ties between neighbouring E4M3 values, normal and subnormal
    big = torch.full_like(mid, 1e9)
    x = torch.cat([bits[bits <= 512.0], codes, mid, torch.nextafter(mid, big), torch.nextafter(mid, -big),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, 448.0, 449.0, 464.0, 1e30])])
    x = torch.cat([x, -x])
    x = torch.cat([x, torch.zeros(-x.numel() % (128 * 128))]).reshape(-1, 128)
    ref = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    got = fast.native.fp8_block_cast(x, torch.ones(x.shape[0] // 128, 1), 128).view(torch.uint8)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {ref.numel()} casts differ"


def test_native_is_unavailable_without_the_built_extension(monkeypatch):
    """No extension (no C compiler at install): available() is False and cpuquant still writes the reference bytes."""
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dsquant.convert._native" else found(name, *a))
    fast.native._load.cache_clear()
    try:
        assert not fast.native.available()
        w = _weights(256, 512)
        for a, b in zip(fast.quantize_nvfp4(w), formats.quantize_nvfp4(w)):
            assert torch.equal(a, b)
    finally:
        monkeypatch.undo()
        fast.native._load.cache_clear()


RECIPES = sorted(p.stem for p in recipes_dir().glob("*.toml"))
# v4-official-names only renames transformers' save of a V4 model (no quantizer runs); the official layout refuses it.
V4_RECIPES = [r for r in RECIPES if r.startswith("v4-") and r != "v4-official-names"]
MATRIX = [("v3", s, r) for s in SOURCES for r in RECIPES if not r.startswith("v4-")] + \
    [("v4", v, r) for v in V4_VARIANTS for r in V4_RECIPES]


def _digests(dst) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in output_tree(dst).items()}


@pytest.mark.parametrize("family,source,recipe", MATRIX, ids=lambda v: str(v))
def test_conversion_with_cpu_quantizers_writes_the_reference_bytes(synth, synth_v4, tmp_path, monkeypatch, family,
                                                                   source, recipe):
    """The expected files come from the format references (the spec); the CPU path must write the same bytes."""
    src = synth("v3", source) if family == "v3" else synth_v4(source)
    cpu, ref = tmp_path / "cpu" / "out", tmp_path / "ref" / "out"  # one folder name: the model card quotes it
    assert convert(src, cpu, recipe, max_shard_size="2MB", progress=False).quantizers == "cpu"
    monkeypatch.setattr("dsquant.convert.pipeline.select_quantizers", lambda device: quantizers.REFERENCE)
    assert convert(src, ref, recipe, max_shard_size="2MB", progress=False).quantizers == "reference"
    want, got = _digests(ref), _digests(cpu)
    assert sorted(got) == sorted(want)
    assert [f for f in want if got[f] != want[f]] == []
