"""The DeepSeek-V4 runner's impl="triton" path (the CUDA path) under the Triton interpreter, against impl="reference",
for every stored expert format: FP8 experts with F32 grids (Base), MXFP4 experts with the E8M0 FP8 rest (instruct),
NVFP4 experts (NVIDIA's hybrid, from `convert -r nvfp4`). The router is the routing kernel and the routed experts
the fused MoE kernel, on every layer, hash layers included.

Each layer is checked on its own input (the triton run's): the routing kernel picks the reference router's experts
with its weights, and the fused experts give the runner's expert loop on the same bf16 input (the kernel's input
dtype). The fused kernel rounds its intermediates to bf16 before the next activation quantizer (its spec,
dsquant.kernels.moe.reference): on FP8/NVFP4 activations that moves some codes by one step, so the per-layer
bound is the format's (FP8 1e-3, NVFP4 1e-2, house style). End to end the synthetic model turns such code
flips, and those of the float32 summation order in the other kernels, into logit differences of 1e-3 to 5e-3
(the FP8 GEMM path alone, experts looped: 3e-4); doubling one expert's down scale of four gives 3e-2.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from dsquant.kernels.testing import assert_close_global
from typer.testing import CliRunner

from dsquant.checkpoint.synth_v4 import make_synthetic_v4_checkpoint
from dsquant.cli import app
from dsquant.runner.fused_experts import fused_routed
from dsquant.runner.load import load_model
from dsquant.runner.model import experts_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# stored expert format -> (how it is made, the fused kernel's fmt, per-layer bound of the fused experts)
CASES = {"fp8_f32": ("flash-base", "fp8", 1e-3), "mxfp4": ("flash", "mxfp4", 1e-3), "nvfp4": ("flash", "nvfp4", 1e-2)}
LOGITS_MAX_DIFF = 1e-2  # end to end (module docstring)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4tri")
    out = {
        "flash": make_synthetic_v4_checkpoint(root / "flash", variant="flash", num_shards=1),
        "flash-base": make_synthetic_v4_checkpoint(root / "base", variant="flash-base", num_shards=1),
    }
    r = CliRunner().invoke(app, ["convert", str(out["flash"]), str(root / "nvfp4"), "-r", "nvfp4"])
    assert r.exit_code == 0, r.output
    return out | {"nvfp4": root / "nvfp4"}


def _check_layer(layer: int, moe, x: torch.Tensor, tokens: torch.Tensor, bound: float, case: str) -> None:
    """The routing kernel and the fused experts of one MoE layer against the reference router and expert loop."""
    x, tokens = x.reshape(-1, x.shape[-1]), tokens.reshape(-1)
    w_ref, ids_ref = moe.gate(x, tokens)
    w, ids = moe.gate(x, tokens, True)
    order, order_ref = ids.long().sort(dim=-1), ids_ref.sort(dim=-1)
    assert torch.equal(order.values, order_ref.values), f"{case} layer {layer}: the routing kernel's experts"
    torch.testing.assert_close(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), rtol=1e-5, atol=1e-6)
    xb = x.to(torch.bfloat16).to(x.dtype)
    counts = torch.bincount(ids_ref.flatten(), minlength=len(moe.experts))
    loop = experts_ref(xb, w_ref, ids_ref, moe.experts, counts)
    assert_close_global(
        fused_routed(x, w, ids, moe._stack[1], moe.limit),
        loop,
        bound,
        f"{case} layer {layer}: fused experts vs the expert loop",
    )


@pytest.mark.parametrize("case", list(CASES))
def test_v4_triton_path_runs_the_moe_kernels_and_matches_reference(case, checkpoints, monkeypatch):
    import dsquant.kernels.moe as moe

    variant, fmt, bound = CASES[case]
    ckpt = checkpoints[case if case == "nvfp4" else variant]
    calls, routes = [], []
    fused, route = moe.fused_moe, moe.deepseek_route
    monkeypatch.setattr(moe, "fused_moe", lambda *a, **k: calls.append((k["fmt"], k["swiglu_limit"],
                                                                         k["a13_scale"] is not None))
                        or fused(*a, **k))  # fmt: skip
    monkeypatch.setattr(moe, "deepseek_route", lambda *a, **k: routes.append(k["tid2eid"] is not None)
                        or route(*a, **k))  # fmt: skip
    ref, reader = load_model(ckpt, impl="reference", dtype=torch.float32, device=DEV)
    tri, _ = load_model(ckpt, impl="triton", dtype=torch.float32, device=DEV)
    args = reader.args
    inputs = []
    for block in tri.layers:
        block.ffn.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0].detach(), a[1])))
    tokens = torch.randint(2, args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        a, e = tri(tokens), ref(tokens)
        n = args.n_layers
        assert calls == [(fmt, args.swiglu_limit, fmt == "nvfp4")] * n, "every layer's routed experts run fused"
        assert routes == [i < args.n_hash_layers for i in range(n)], "the routing kernel, hash on the first layers"
        for layer, (mod, x, tok) in enumerate(inputs):
            _check_layer(layer, mod, x, tok, bound, case)
    assert_close_global(a, e, LOGITS_MAX_DIFF, f"V4 {case} logits, triton path vs reference")


def test_v4_triton_path_loops_when_nvfp4_input_scales_are_dynamic(checkpoints, monkeypatch):
    """An NVFP4 expert without a static input scale quantizes its activation per call: not the fused kernel's."""
    import dsquant.kernels.moe as moe

    calls = []
    monkeypatch.setattr(moe, "fused_moe", lambda *a, **k: calls.append(k["fmt"]))
    tri, reader = load_model(checkpoints["nvfp4"], impl="triton", dtype=torch.float32, device=DEV)
    for name, mod in tri.named_modules():
        if ".ffn.experts.0." in name and getattr(mod, "w", None) is not None:
            mod.set_weight(dataclasses.replace(mod.w, input_scale=None))
    with torch.no_grad():
        tri(torch.tensor([[5, 6, 7]], device=DEV))
    assert calls == []


@pytest.mark.parametrize("case", ["flash", "nvfp4"])
def test_observed_experts_run_as_their_own_linears(checkpoints, monkeypatch, case):
    """Calibration hooks every expert linear for its inputs; on the triton path those experts must not vanish into
    the fused kernel, or CUDA calibration would see no expert input at all."""
    import dsquant.kernels.moe as moe

    calls, seen = [], []
    monkeypatch.setattr(moe, "fused_moe", lambda *a, **k: calls.append(k["fmt"]))
    tri, _ = load_model(checkpoints[case], impl="triton", dtype=torch.float32, device=DEV)
    for name, mod in tri.named_modules():
        if ".ffn.experts." in name and getattr(mod, "w", None) is not None:
            mod.register_forward_pre_hook(lambda m, args, name=name: seen.append(name))
    with torch.no_grad():
        tri(torch.tensor([[5, 6, 7]], device=DEV))
    assert calls == [] and seen, (calls, len(seen))
