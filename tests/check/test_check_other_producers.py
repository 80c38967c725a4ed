"""`inspect --check` on checkpoints other tools write: transformers' save_pretrained and compressed-tensors'
own FP8 presets (llm-compressor's output). They load in vLLM and SGLang, so no rule reports an error."""

from __future__ import annotations

import pytest
import torch

from dsquant.check import check_checkpoint
from dsquant.checkpoint.synth import make_synthetic_checkpoint
from tests.check.check_helpers import hits, only

transformers = pytest.importorskip("transformers")


def test_transformers_bf16_save_has_no_errors(tmp_path):
    """transformers saves a BF16 model's e_score_correction_bias in BF16; engines cast it into their float32
    parameter, so the rounding is worth a warning, not an error."""
    cfg = transformers.DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                                        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                                        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                        v_head_dim=16, num_nextn_predict_layers=0)
    transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    findings = check_checkpoint(tmp_path)
    assert not [f for f in findings if f.severity == "error"], [str(f) for f in findings]
    assert "BF16" in only(findings, "router-bias", "warning").message


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8"])
def test_compressed_tensors_fp8_presets_have_no_errors(tmp_path, preset):
    """The library writes FP8 scales (and FP8's static input_scale) in the model's dtype, BF16; engines cast
    them into float32 parameters on load."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed in this env")
    from tests.ct_library import library_checkpoint

    src = make_synthetic_checkpoint(tmp_path / "src", variant="v3", source="bf16", num_shards=1, n_routed_experts=4)
    findings = check_checkpoint(library_checkpoint(src, tmp_path / preset, preset))
    assert not [f for f in findings if f.severity == "error"], [str(f) for f in findings]
    if preset == "FP8":
        assert "input_scale is BF16" in only(findings, "scale-dtype", "warning").message
    else:
        assert not hits(findings, "scale-dtype", "warning")
