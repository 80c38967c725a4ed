"""The V4 runner executes the official stored formats: FP8 with E8M0 (instruct) or F32 (Base) 128x128 scale
grids, FP4 routed experts (I8 packed E2M1 + E8M0 per 32). Reference: transformers' own dequantization of the
same tensors (`Fp8Dequantize`, what `from_pretrained` runs with `dequantize=True`), loaded into
DeepseekV4ForCausalLM as a float checkpoint; the runner reads the quantized files with unquantized activations
(act="none"), the arithmetic transformers runs after dequantizing."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsquant.formats.fp8 import quantize_fp8_block
from dsquant.formats.mxfp4 import quantize_mxfp4
from dsquant.runner.v4.args import V4Args
from dsquant.runner.v4.load import load_tensors
from dsquant.runner.v4.model import Transformer
from tests.runner.test_v4_vs_transformers import OFFICIAL, max_rel_err, official_state_dict, random_hf_model

transformers = pytest.importorskip("transformers")
from transformers.integrations.finegrained_fp8 import Fp8Dequantize  # noqa: E402

CONFIG = dict(OFFICIAL, moe_intermediate_size=32,  # MXFP4 blocks of 32 along every expert's K
              quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]})  # fmt: skip
FP8 = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])\.weight$")
EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


def quantize_official(sd: dict, fp4_experts: bool) -> dict:
    """Official float tensors -> the official mixed layout (instruct: E8M0 scales + FP4 experts; Base: F32, FP8)."""
    out = {}
    for name, t in sd.items():
        stem = name[: -len(".weight")]
        if EXPERT.search(name) and fp4_experts:
            packed, scale = quantize_mxfp4(t)
            out[name], out[f"{stem}.scale"] = packed.view(torch.int8), scale.view(torch.float8_e8m0fnu)
        elif FP8.search(name) or EXPERT.search(name):
            q, scale = quantize_fp8_block(t, ue8m0=fp4_experts)
            out[name], out[f"{stem}.scale"] = q, scale.to(torch.float8_e8m0fnu) if fp4_experts else scale
        else:
            out[name] = t
    return out


def dequantized_by_transformers(quantized: dict) -> dict:
    deq = Fp8Dequantize(None)
    out = {k: v for k, v in quantized.items() if not k.endswith(".scale")}
    for name in out:
        scale = quantized.get(name[: -len(".weight")] + ".scale")
        if scale is not None:
            out[name] = deq._dequantize_one(out[name], scale, torch.float32)
    return out


@pytest.mark.parametrize("fp4_experts", [True, False], ids=["instruct_fp4_e8m0", "base_fp8_f32"])
def test_v4_stored_formats_match_transformers_dequantized(tmp_path, fp4_experts):
    quantized = quantize_official(official_state_dict(random_hf_model(CONFIG)), fp4_experts)
    assert any(t.dtype == torch.float8_e4m3fn for t in quantized.values())
    save_file(quantized, str(tmp_path / "model.safetensors"))
    ref = tmp_path / "dequantized"
    ref.mkdir()
    save_file(dequantized_by_transformers(quantized), str(ref / "model.safetensors"))
    (ref / "config.json").write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "quantization_config"}))
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()

    ours = Transformer(V4Args.from_config(CONFIG)).eval()
    load_tensors(ours, load_file(str(tmp_path / "model.safetensors")), CONFIG["quantization_config"], act="none")
    fmts = {m.w.fmt for m in ours.modules() if getattr(m, "w", None) is not None}
    assert fmts == ({"bf16", "fp8-block", "mxfp4"} if fp4_experts else {"bf16", "fp8-block"})

    tokens = torch.randint(0, CONFIG["vocab_size"], (1, 140), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        actual = ours(tokens)
    err = max_rel_err(actual, expected)
    assert err < 1e-4, f"max |logit diff| / max |logit| = {err:.3e}"


def test_v4_load_names_the_missing_tensor():
    sd = official_state_dict(random_hf_model(OFFICIAL))
    del sd["layers.2.attn.compressor.ape"]
    with pytest.raises(ValueError, match=r"missing tensor layers\.2\.attn\.compressor\.ape"):
        load_tensors(Transformer(V4Args.from_config(OFFICIAL)), sd)


def test_v4_load_rejects_a_wrong_scale_grid():
    sd = quantize_official(official_state_dict(random_hf_model(CONFIG)), fp4_experts=True)
    sd["layers.0.attn.wq_a.scale"] = torch.ones(2, 2, dtype=torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wq_a: scale shape \(2, 2\)"):
        load_tensors(Transformer(V4Args.from_config(CONFIG)), sd, CONFIG["quantization_config"], act="none")
