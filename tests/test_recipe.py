"""Recipe files: strict parsing, first-match rules, ignore before rules, {mtp}, fused groups, shipped recipes."""

from __future__ import annotations

import pytest

from dsquant.recipe import Ignore, Rule, compile_pattern, load_recipe, parse_recipe
from dsquant.recipe_files import recipes_dir, shipped_recipes

MINIMAL = """# a test recipe
version = 1
conventions = ["compressed-tensors"]
fused_groups = [["gate_proj", "up_proj"]]

[[ignore]]
match = "lm_head"
reason = "kept"

[[rules]]
match = "*.experts.*"
format = "mxfp4"
reason = "experts"

[[rules]]
match = "*"
format = "int8"
reason = "rest"
"""


def test_minimal_recipe_parses_into_frozen_dataclasses():
    r = parse_recipe(MINIMAL, "t")
    assert r.name == "t" and r.version == 1 and r.summary == "a test recipe"
    assert r.conventions == ("compressed-tensors",) and r.fused_groups == (("gate_proj", "up_proj"),)
    assert r.ignore == (Ignore("lm_head", "kept"),)
    assert r.rules[0] == Rule("*.experts.*", "mxfp4", "experts")
    with pytest.raises(AttributeError):
        r.rules[0].format = "nvfp4"  # frozen


def test_first_match_wins_and_ignore_comes_first():
    c = parse_recipe(MINIMAL, "t").compiled()
    assert c.resolve("lm_head") == Ignore("lm_head", "kept")
    assert c.resolve("model.layers.3.mlp.experts.7.up_proj").format == "mxfp4"
    assert c.resolve("model.layers.3.mlp.shared_experts.up_proj").format == "int8"


def test_patterns_match_whole_names_so_the_router_rule_misses_gate_proj():
    pat = compile_pattern("*.mlp.gate")
    assert pat.fullmatch("model.layers.3.mlp.gate")
    assert not pat.fullmatch("model.layers.3.mlp.gate_proj")
    assert not pat.fullmatch("model.layers.3.mlp.shared_experts.gate_proj")
    assert compile_pattern(r"re:.*\.mlp\.gate").fullmatch("model.layers.0.mlp.gate")


def test_mtp_placeholder_expands_to_the_models_mtp_layers():
    pat = compile_pattern("model.layers.{mtp}.*", (61,))
    assert pat.fullmatch("model.layers.61.eh_proj") and not pat.fullmatch("model.layers.6.eh_proj")
    assert not pat.fullmatch("model.layers.161.eh_proj")
    assert not compile_pattern("model.layers.{mtp}.*", ()).fullmatch("model.layers.61.eh_proj")  # no MTP layer


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("version = 1", "extra = 1\nversion = 1"),
     "unknown key(s) ['extra']; allowed: ['conventions', 'fused_groups',"),
    (lambda t: t.replace('reason = "experts"', 'reason = "experts"\nbits = 4'), "unknown key(s) ['bits']"),
    (lambda t: t + "\nextra = 1\n", "[[rules]] #2: unknown key(s) ['extra']; allowed: ['format', 'input_scale',"),
    (lambda t: t.replace('format = "int8"', 'format = "int4"'), "format 'int4' is unknown; known formats"),
    (lambda t: t.replace("version = 1", "version = 2"), "version = 2; this dsquant reads recipe versions (1,)"),
    (lambda t: t.replace('["compressed-tensors"]', '["deepseek"]'),
     "format 'mxfp4' (rule '*.experts.*') cannot be stored in ['deepseek']"),
    (lambda t: t.replace('["compressed-tensors"]', '["gguf"]'), "give one or more of"),
    (lambda t: t.replace('reason = "rest"', 'reason = "rest"\nue8m0 = true'),
     "option(s) ['ue8m0'] do not apply to format 'int8'"),
    (lambda t: t.replace('reason = "experts"', 'reason = "experts"\nscale_rule = "round"'),
     "scale_rule 'round' is unknown"),
    (lambda t: t.replace('match = "lm_head"', 'match = 3'), "needs string keys 'match' and 'reason'"),
    (lambda t: t.replace("version = 1", "version = ["), "not valid TOML"),
])
def test_bad_recipes_say_what_is_allowed(edit, message):
    with pytest.raises(ValueError) as err:
        parse_recipe(edit(MINIMAL), "t", where="t.toml")
    assert message in str(err.value) and str(err.value).startswith("t.toml")


def test_rule_options_are_type_checked():
    text = MINIMAL.replace('format = "int8"', 'format = "nvfp4"\ninput_scale = true')
    with pytest.raises(ValueError, match="input_scale = True has the wrong type"):
        parse_recipe(text, "t")
    with pytest.raises(ValueError, match="positive finite"):
        parse_recipe(MINIMAL.replace('format = "int8"', 'format = "nvfp4"\ninput_scale = -1.0'), "t")


def test_shipped_recipes_load_and_say_why():
    names = {n for n, _ in shipped_recipes()}
    assert {"fp8-block", "fp8-block-ue8m0", "int8", "nvfp4", "nvfp4-experts-only", "mxfp4", "v4-fp8-block",
            "v4-nvfp4", "v4-mxfp4"} <= names
    for name, summary in shipped_recipes():
        r = load_recipe(name)
        assert summary and r.summary == summary, name
        assert all(entry.reason for entry in r.ignore + r.rules), name
        # DeepSeek-V4's official names fuse an expert's w1 and w3; V3's HF names gate/up and q_a/kv_a
        v4 = "deepseek-v4" in r.conventions
        assert r.fused_groups == ((("w1", "w3"),) if v4 else
                                  (("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))), name
        text = (recipes_dir() / f"{name}.toml").read_text()
        assert text.startswith("# "), f"{name}: the first line must be its one-line summary"
    assert load_recipe("fp8-block-ue8m0").rules[-1].ue8m0 and not load_recipe("fp8-block").rules[-1].ue8m0


def test_recipe_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(MINIMAL)
    assert load_recipe(str(path)).name == "mine" and load_recipe(str(path)).path == str(path)
    with pytest.raises(ValueError, match="unknown recipe 'nope'; shipped recipes: "):
        load_recipe("nope")
    assert load_recipe("nvfp4").to_dict()["rules"][-1]["format"] == "nvfp4"


def test_dspark_placeholder_matches_the_draft_stages_only():
    rx = compile_pattern("mtp.{dspark}.ffn.experts.*", dspark_stages=(0, 1, 2))
    assert rx.fullmatch("mtp.2.ffn.experts.7.w1") and not rx.fullmatch("mtp.3.ffn.experts.7.w1")
    assert not compile_pattern("mtp.{dspark}.ffn.experts.*").fullmatch("mtp.0.ffn.experts.7.w1")  # MTP, no DSpark
    assert compile_pattern("re:mtp\\.{dspark}\\..*", dspark_stages=(1,)).fullmatch("mtp.1.x")
