"""Shared helpers of the --check rule tests: the fixture kinds, layer prefixes and finding filters."""

from __future__ import annotations

from dsquant.check import Finding, check_checkpoint

KINDS = ["bf16", "deepseek-fp8", "modelopt", "ct-nvfp4", "ct-mxfp4", "ct-int8"]
L0, L1 = "model.layers.0.", "model.layers.1."
EXP0 = L1 + "mlp.experts.0."


def run(tmp_path, ck, **kw) -> list[Finding]:
    return check_checkpoint(ck.write(tmp_path / "ckpt", **kw))


def hits(findings, rule, severity="error") -> list[Finding]:
    return [f for f in findings if f.rule == rule and f.severity == severity]


def only(findings, rule, severity="error") -> Finding:
    got = hits(findings, rule, severity)
    assert len(got) == 1, f"expected one {severity} {rule}, got: {[str(f) for f in findings]}"
    return got[0]
