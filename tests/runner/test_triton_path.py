"""The runner's impl="triton" path (the CUDA path) under the Triton interpreter, against impl="reference"."""

from __future__ import annotations

import os

import pytest
import torch
from dsquant.kernels.testing import assert_close_global

from dsquant.formats.fp8 import quantize_fp8_block
from dsquant.formats.int8 import quantize_int8_per_channel
from dsquant.formats.mxfp4 import quantize_mxfp4
from dsquant.formats.nvfp4 import quantize_nvfp4
from dsquant.formats.weight import QuantizedWeight
from dsquant.runner.linear import linear_ref, linear_triton

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _weights():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    return {
        "fp8-block": QuantizedWeight("fp8-block", *quantize_fp8_block(w)),
        "int8": QuantizedWeight("int8", *quantize_int8_per_channel(w)),
        "nvfp4": QuantizedWeight("nvfp4", *quantize_nvfp4(w), input_scale=torch.tensor(0.002)),
        "mxfp4": QuantizedWeight("mxfp4", *quantize_mxfp4(w)),
    }


@pytest.mark.parametrize("fmt", ["fp8-block", "int8", "nvfp4", "mxfp4"])
def test_linear_kernels_match_reference_numerics(fmt):
    lw = _weights()[fmt].apply(lambda t: t.to(DEV))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEV)
    # Same quantized operands; the kernels sum in a different order and NVFP4 rounds its fake-quantized
    # activation to bf16 before the W4A16 GEMM: 1e-5 is ~20x the measured 3e-6 and far below a wrong scale.
    assert_close_global(linear_triton(x, lw), linear_ref(x, lw), 1e-5, fmt)


def test_demo_model_triton_path_matches_reference(monkeypatch):
    import dsquant.kernels.moe as moe

    from dsquant.demo import ASSET_DIR
    from dsquant.runner.load import load_model

    calls = []
    fused = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *a, **k: calls.append(k["fmt"]) or fused(*a, **k))
    ref, _ = load_model(ASSET_DIR, impl="reference", dtype=torch.float32)
    tri, _ = load_model(ASSET_DIR, impl="triton", dtype=torch.float32)
    x = torch.tensor([[256] + list(b"import sys\nprint(sys.argv)\n")])
    with torch.no_grad():
        a, e = tri(x), ref(x)
    assert calls == ["fp8"] * 3, "the three MoE layers must run the fused MoE kernel"
    # GEMM/norm kernels sum in another order (float32 rounding), and the fused MoE kernel rounds the
    # expert activations to bf16 (its spec): calc_diff measured 4.9e-5; 2e-4 keeps 4x margin and is far
    # below what a wrong scale or a mis-stacked expert gives (~1e-1 and above).
    assert_close_global(a, e, 2e-4, "demo logits, triton path vs reference")
