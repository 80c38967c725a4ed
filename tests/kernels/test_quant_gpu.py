"""Compiled quant kernels on a CUDA GPU at DeepSeek shapes, bit for bit against the references.

The references run on the same GPU (torch CUDA: IEEE division, RNE casts) for speed; one test per
format also compares with the CPU reference, which is what `convert --device cpu` writes.
Run: python -m pytest tests/kernels/test_quant_gpu.py -m gpu -q
"""

from __future__ import annotations

import pytest
import torch

from dsquant.kernels import quant
from dsquant.kernels.quant import reference as ref
from dsquant.kernels.testing import DEEPSEEK_V3_NK, assert_exact
from tests.kernels.test_quant_data import (
    ROW_KINDS, TAME_KINDS, adversarial, check_div_rn_shared, division_cases, gaussian,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
HIDDEN = 7168
ROWS = [1, 7, 128, 4096]


def _exact(got, want, what):
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert_exact(a.reshape(-1) if a.dim() == 0 else a, e.reshape(-1) if e.dim() == 0 else e, f"{what} output {i}")


def _activations(m: int, k: int = HIDDEN, seed: int = 0, kinds=None) -> torch.Tensor:
    """Adversarial rows first (every kind appears once m >= 9), Gaussian activations with outliers after."""
    n_adv = min(m, 72)
    adv = adversarial(n_adv, k, seed=seed) if kinds is None else adversarial(n_adv, k, seed=seed, kinds=kinds)
    return torch.cat([adv, gaussian(m - n_adv, k, seed=seed)]).to(DEVICE)


def _weight(n: int, k: int, seed: int = 0, kinds=TAME_KINDS) -> torch.Tensor:
    """N(0, 0.02) weights with the first 144 rows adversarial (ragged edge blocks stay in the Gaussian part).

    No 1e35 rows by default: they would set NVFP4's global scale and flush the rest to zero codes.
    """
    w = gaussian(n, k, seed=seed, dtype=torch.float32) * 0.02
    w[:144] = adversarial(144, k, seed=seed, kinds=kinds).float()
    return w.to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_fp8_and_int8_activation_quant_gpu(m):
    x = _activations(m, seed=m)
    for kwargs in ({}, {"ue8m0": True}, {"column_major_scales": True}):
        got = quant.quantize_fp8_per_token_group(x, **kwargs)
        _exact(got, ref.quantize_fp8_per_token_group_ref(x, **kwargs), f"fp8 group {kwargs} M={m}")
    _exact(quant.quantize_fp8_per_token(x), ref.quantize_fp8_per_token_ref(x), f"fp8 per-token M={m}")
    _exact(quant.quantize_int8_per_token(x), ref.quantize_int8_per_token_ref(x), f"int8 per-token M={m}")


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_fp4_activation_quant_gpu(m):
    x = _activations(m, seed=m + 1)
    _exact(quant.quantize_nvfp4(x), ref.quantize_nvfp4_ref(x), f"nvfp4 computed global scale M={m}")
    tame = _activations(m, seed=m + 2, kinds=TAME_KINDS)  # no 1e35 rows to flush the rest to zero codes
    _exact(quant.quantize_nvfp4(tame), ref.quantize_nvfp4_ref(tame), f"nvfp4 computed global scale, tame M={m}")
    gs = torch.tensor(2.0**-3, device=DEVICE)
    _exact(quant.quantize_nvfp4(x, gs), ref.quantize_nvfp4_ref(x, gs), f"nvfp4 given global scale M={m}")
    for rule in ("ocp", "ceil"):
        _exact(quant.quantize_mxfp4(x, rule), ref.quantize_mxfp4_ref(x, rule), f"mxfp4 {rule} M={m}")


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_silu_mul_quantize_fp8_gpu(m):
    """gate_up [M, 2 * 2048] (DeepSeek-V3 expert intermediate 2048); reference on the same GPU (same expf)."""
    g = torch.Generator().manual_seed(m)
    gate_up = (torch.randn(m, 4096, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    _exact(quant.silu_mul_quantize_fp8(gate_up), ref.silu_mul_quantize_fp8_ref(gate_up), f"silu-mul fp8 M={m}")
    kwargs = {"ue8m0": True, "column_major_scales": True}
    _exact(quant.silu_mul_quantize_fp8(gate_up, **kwargs), ref.silu_mul_quantize_fp8_ref(gate_up, **kwargs), "opts")


def test_kernels_match_the_cpu_reference_gpu():
    """What convert --device cuda writes must equal what convert --device cpu writes, byte for byte."""
    x = _activations(128, seed=5)
    xc = x.cpu()
    _exact(quant.quantize_fp8_per_token_group(x), ref.quantize_fp8_per_token_group_ref(xc), "fp8 group vs CPU")
    _exact(quant.quantize_int8_per_token(x), ref.quantize_int8_per_token_ref(xc), "int8 vs CPU")
    _exact(quant.quantize_nvfp4(x), ref.quantize_nvfp4_ref(xc), "nvfp4 vs CPU")
    _exact(quant.quantize_mxfp4(x), ref.quantize_mxfp4_ref(xc), "mxfp4 vs CPU")
    w = _weight(2112, HIDDEN, seed=5)
    _exact(quant.quantize_fp8_block(w), ref.quantize_fp8_block_ref(w.cpu()), "fp8 block vs CPU")


@pytest.mark.parametrize("n,k", DEEPSEEK_V3_NK, ids=lambda v: str(v))
def test_weight_quant_gpu(n, k):
    w = _weight(n, k, seed=n)
    q, scale = quant.quantize_fp8_block(w)
    _exact((q, scale), ref.quantize_fp8_block_ref(w), f"fp8 block {(n, k)}")
    assert_exact(quant.dequantize_fp8_block(q, scale), ref.dequantize_fp8_block_ref(q, scale), f"fp8 dequant {(n, k)}")
    packed, block_scale, gs = quant.quantize_nvfp4(w)
    _exact((packed, block_scale, gs), ref.quantize_nvfp4_ref(w), f"nvfp4 {(n, k)}")
    assert_exact(quant.dequantize_nvfp4(packed, block_scale, gs), ref.dequantize_nvfp4_ref(packed, block_scale, gs))
    packed, scale = quant.quantize_mxfp4(w)
    _exact((packed, scale), ref.quantize_mxfp4_ref(w), f"mxfp4 {(n, k)}")
    assert_exact(quant.dequantize_mxfp4(packed, scale), ref.dequantize_mxfp4_ref(packed, scale), f"mxfp4 deq {(n, k)}")
    _exact(quant.quantize_int8_per_token(w), ref.quantize_int8_per_token_ref(w), f"int8 channel {(n, k)}")


def test_div_rn_shared_matches_div_rn_gpu():
    """The division every quantizer uses, against div.rn.f32, on 2^26 hard and random pairs."""
    x, d = division_cases(1 << 26, seed=8)
    check_div_rn_shared(x.to(DEVICE), d.to(DEVICE))


def test_fp8_block_ue8m0_and_fp32_weights_gpu():
    w = _weight(576, HIDDEN, seed=6, kinds=ROW_KINDS)  # with the 1e35 rows
    _exact(quant.quantize_fp8_block(w, ue8m0=True), ref.quantize_fp8_block_ref(w, ue8m0=True), "fp8 block ue8m0")
    _exact(quant.quantize_fp8_block(w.float()), ref.quantize_fp8_block_ref(w.float()), "fp8 block fp32 input")


def test_outputs_have_no_unwritten_bytes_gpu():
    """Outputs land in freed blocks pre-filled with 0x00, then 0x7F: equal results mean every byte was written."""
    x = _activations(7, seed=7)

    def run():
        return quant.quantize_nvfp4(x) + quant.quantize_fp8_per_token_group(x, column_major_scales=True)

    sizes = [t.numel() * t.element_size() for t in run()]
    outs = []
    for fill in (0x00, 0x7F):
        pool = [torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(fill) for n in sizes]
        del pool  # the caching allocator hands these same blocks to the next allocations of these sizes
        outs.append(run())
    _exact(outs[0], outs[1], "outputs over two poisoned pools")
