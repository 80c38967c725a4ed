"""The model card: metadata read back with huggingface_hub's ModelCard / metadata helpers, and its content."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load

from dsquant.model_card import CARD_MARKER, base_model_id, write_model_card
from tests.check.ckpt_factory import build

RECIPE = {
    "dsquant_version": "0.1.0",
    "recipe": {"name": "nvfp4", "version": 1, "resolved": {"rules": [{"match": "*.mlp.*", "format": "nvfp4"}]}},
    "convention": "modelopt",
    "source": {"repo_id": "deepseek-ai/DeepSeek-R1", "revision": "main", "architectures": ["DeepseekV3ForCausalLM"],
               "model_type": "deepseek_v3", "dtype": "float8_e4m3fn"},
    "created": "2026-11-25T12:00:00Z",
    "bytes_in": 689_000_000_000,
    "bytes_out": 395_000_000_000,
    "tensors": {"nvfp4": 44_000, "bf16": 1_200},
    "excluded": [{"pattern": "*.mlp.gate", "reason": "the router stays BF16"},
                 {"pattern": "lm_head", "reason": "the output head"}],
    "activation_scales": "default",
}
EVAL = {"protocol": {"metric": "token-level perplexity", "seq_len": 2048, "overlap": 0,
                     "text": {"source": "wiki.test.raw", "chars": 1_000_000}},
        "results": [{"name": "nvfp4", "ppl": 3.4567, "delta_ppl_pct": 1.23, "kld": 0.0123, "top1": 0.9512,
                     "tokens": 290_000, "kv_cache": "fp8"},
                    {"name": "partial"}],
        "base": {"name": "DeepSeek-R1", "ppl": 3.415, "tokens": 290_000, "kv_cache": "bf16"}}


def make(tmp_path, kind="modelopt", recipe=None, eval_results=None):
    out = build(kind).write(tmp_path / "out")
    (out / "dsquant_recipe.json").write_text(json.dumps(recipe or RECIPE))
    if eval_results is not None:
        (out / "eval_results.json").write_text(json.dumps(eval_results))
    return out


def test_metadata_reads_back_with_huggingface_hub(tmp_path):
    card_path = write_model_card(make(tmp_path))
    meta = metadata_load(card_path)
    assert meta["base_model"] == "deepseek-ai/DeepSeek-R1"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] and meta["pipeline_tag"] == "text-generation"
    assert {"dsquant", "nvfp4", "modelopt"} <= set(meta["tags"])
    card = ModelCard.load(card_path)
    assert isinstance(card.data, ModelCardData) and card.data.base_model == "deepseek-ai/DeepSeek-R1"
    assert CARD_MARKER in card.text


def test_body_has_recipe_exclusions_size_serving_and_default_scales(tmp_path):
    text = write_model_card(make(tmp_path)).read_text()
    assert "Dense MLP, shared experts and routed experts are stored as **nvfp4**" in text
    assert "| `*.mlp.gate` | the router stays BF16 |" in text and "| `lm_head` | the output head |" in text
    assert "689.00 GB → 395.00 GB (1.74× smaller)" in text
    assert "Activation scales are the uncalibrated default" in text
    assert "vllm serve" in text and "sglang.launch_server" in text and "--quantization modelopt_fp4" in text
    assert '"format": "nvfp4"' in text  # the recipe in full
    assert "## Accuracy" not in text  # no eval_results.json, no table
    assert "`dsquant inspect --check` (the vLLM, SGLang and TensorRT-LLM loading rules dsquant knows): no errors." \
        in text


def test_eval_table_tolerates_missing_fields(tmp_path):
    text = write_model_card(make(tmp_path, eval_results=EVAL)).read_text()
    assert "| nvfp4 | 3.4567 | +1.23% | 0.01230 | 95.12% | 290,000 | fp8 |" in text
    assert "| partial | – | – | – | – | – | – |" in text
    assert "| DeepSeek-R1 (source) | 3.4150 | – | – | – | 290,000 | bf16 |" in text
    assert text.index("DeepSeek-R1 (source)") < text.index("| nvfp4 |")
    assert "- seq_len: 2048" in text and "- text: source=wiki.test.raw, chars=1000000" in text


def test_calibrated_scales_are_not_called_default(tmp_path):
    text = write_model_card(make(tmp_path, recipe={**RECIPE, "activation_scales": "calibrated"})).read_text()
    assert "uncalibrated" not in text


@pytest.mark.parametrize("kind,convention,fmt,flag", [
    ("ct-nvfp4", "compressed-tensors", "nvfp4", None),
    ("ct-int8", "compressed-tensors", "int8", None),
    ("deepseek-fp8", "deepseek", "fp8-block", None),
])
def test_serve_commands_follow_the_convention(tmp_path, kind, convention, fmt, flag):
    recipe = {**RECIPE, "convention": convention, "tensors": {fmt: 10, "bf16": 5}}
    text = write_model_card(make(tmp_path, kind, recipe=recipe)).read_text()
    assert "vllm serve <your-org>/out" in text and "--model-path <your-org>/out" in text
    assert "modelopt_fp4" not in text and "trtllm-serve" not in text
    assert fmt in metadata_load(tmp_path / "out" / "README.md")["tags"]


def test_license_is_copied_from_the_source_card(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: deepseek\nlicense_link: LICENSE\n---\nsrc\n")
    recipe = {**RECIPE, "source": {"path": str(src)}}
    meta = metadata_load(write_model_card(make(tmp_path, recipe=recipe)))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "deepseek", "LICENSE")
    assert "base_model" not in meta and "base_model_relation" not in meta  # a bare local path has no Hub id


def test_base_model_from_a_hub_cache_path():
    assert base_model_id({"path": "/c/hub/models--deepseek-ai--DeepSeek-V3/snapshots/abc"}) == "deepseek-ai/DeepSeek-V3"
    assert base_model_id({"repo_id": "org/name"}) == "org/name"
    assert base_model_id({"path": "/data/ckpt"}) is None


def test_not_a_dsquant_output(tmp_path):
    out = build("bf16").write(tmp_path / "plain")
    with pytest.raises(ValueError, match="no dsquant_recipe.json; not a dsquant output"):
        write_model_card(out)


def test_card_reports_loading_check_findings(tmp_path):
    out = make(tmp_path)
    (out / "tokenizer_config.json").unlink()
    text = write_model_card(out).read_text()
    assert "no errors; 1 warning(s): tokenizer-missing." in text


def test_table_cells_escape_pipes(tmp_path):
    recipe = {**RECIPE, "excluded": [{"pattern": "re:.*(q_a|kv_a).*", "reason": "fused\npartners"}]}
    text = write_model_card(make(tmp_path, recipe=recipe)).read_text()
    assert "| `re:.*(q_a\\|kv_a).*` | fused partners |" in text
