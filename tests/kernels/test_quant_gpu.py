"""Compiled quant kernels on a CUDA GPU at DeepSeek shapes, bit for bit against the references.

The references run on CPU copies: torch on CUDA divides by a Python scalar as a multiply by its
reciprocal (amax / 448 differs in the last bit), so dsquant.formats on CUDA tensors is not the spec.
Big tensors are checked on a band of rows (the adversarial ones and the ragged edge), the kernel
having run on the whole tensor. Run: python -m pytest tests/kernels/test_quant_gpu.py -m gpu -q
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from dsquant.kernels import quant
from dsquant.kernels.exact_div import div_rn_shared_unsigned, silu_div
from dsquant.kernels.quant import reference as ref
from dsquant.kernels.testing import DEEPSEEK_V3_NK, assert_exact
from triton.language.extra import libdevice

from dsquant.formats.nvfp4 import nvfp4_global_scale
from tests.kernels.test_quant_data import (
    ROW_KINDS,
    TAME_KINDS,
    adversarial,
    assert_outputs_exact,
    check_div_rn_shared,
    division_cases,
    gaussian,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
HIDDEN = 7168
ROWS = [1, 7, 128, 4096]


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


def _band(n: int) -> torch.Tensor:
    """Rows compared with the CPU reference: all of them up to 512, else the first 256 (adversarial rows)
    and the last two 128-row blocks (the ragged edge block included)."""
    if n <= 512:
        return torch.arange(n)
    return torch.cat([torch.arange(256), torch.arange(max(256, ((n - 1) // 128 - 1) * 128), n)])


def _rows_exact(got, x, ref_fn, what, **kwargs):
    """Kernel outputs on the whole x, restricted to _band rows, == ref_fn on those rows of x on CPU."""
    rows = _band(x.shape[0])
    want = ref_fn(x[rows.to(x.device)].cpu(), **kwargs)
    assert_outputs_exact(tuple(t if t.dim() == 0 else t[rows.to(t.device)] for t in got), want, what)


def _cpu_global_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale of the whole x, by the spec on CPU (the CUDA max is exact, the division is not)."""
    return nvfp4_global_scale(x.abs().amax().cpu())


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_fp8_and_int8_activation_quant_gpu(m):
    x = _activations(m, seed=m)
    for kwargs in ({}, {"ue8m0": True}, {"column_major_scales": True}):
        got = quant.quantize_fp8_per_token_group(x, **kwargs)
        _rows_exact(got, x, ref.quantize_fp8_per_token_group_ref, f"fp8 group {kwargs} M={m}", **kwargs)
    q, scale = quant.quantize_fp8_per_token_group(x, column_major_scales=True)
    assert scale.stride() == (1, m) and scale.t().is_contiguous()
    _rows_exact(quant.quantize_fp8_per_token(x), x, ref.quantize_fp8_per_token_ref, f"fp8 per-token M={m}")
    _rows_exact(quant.quantize_int8_per_token(x), x, ref.quantize_int8_per_token_ref, f"int8 per-token M={m}")


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_fp4_activation_quant_gpu(m):
    for x, what in ((_activations(m, seed=m + 1), "adversarial"),
                    (_activations(m, seed=m + 2, kinds=TAME_KINDS), "without 1e35 rows")):
        packed, block_scale, gs = quant.quantize_nvfp4(x)
        want_gs = _cpu_global_scale(x)
        assert_exact(gs.reshape(1), want_gs.reshape(1), f"nvfp4 global scale {what} M={m}")
        _rows_exact((packed, block_scale, gs), x, ref.quantize_nvfp4_ref, f"nvfp4 {what} M={m}", global_scale=want_gs)
        given = torch.tensor(2.0**-3, device=DEVICE)  # saturates the 1e35 rows' block scales at 448
        _rows_exact(quant.quantize_nvfp4(x, given), x, ref.quantize_nvfp4_ref, f"nvfp4 given {what} M={m}",
                    global_scale=given.cpu())
        for rule in ("ocp", "ceil"):
            _rows_exact(quant.quantize_mxfp4(x, rule), x, ref.quantize_mxfp4_ref, f"mxfp4 {rule} {what} M={m}",
                        scale_rule=rule)


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_silu_mul_quantize_fp8_gpu(m):
    """gate_up [M, 2 * 2048] (DeepSeek-V3 expert intermediate 2048). SiLU-and-mul by torch on the GPU (the
    same expf as the kernel's libdevice call), then the FP8 quantization spec on CPU."""
    g = torch.Generator().manual_seed(m)
    gate_up = (torch.randn(m, 4096, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    h = ref.silu_mul_bf16_ref(gate_up)
    _rows_exact(quant.silu_mul_quantize_fp8(gate_up), h, ref.quantize_fp8_per_token_group_ref, f"silu-mul M={m}")
    kwargs = {"ue8m0": True, "column_major_scales": True}
    _rows_exact(quant.silu_mul_quantize_fp8(gate_up, **kwargs), h, ref.quantize_fp8_per_token_group_ref,
                f"silu-mul {kwargs} M={m}", **kwargs)


@pytest.mark.parametrize("n,k", DEEPSEEK_V3_NK, ids=lambda v: str(v))
def test_weight_quant_gpu(n, k):
    w = _weight(n, k, seed=n)
    rows = _band(n)
    blocks = torch.unique(rows // 128)
    q, scale = quant.quantize_fp8_block(w)
    want_q, want_scale = ref.quantize_fp8_block_ref(w[rows.to(DEVICE)].cpu())
    assert_exact(q[rows.to(DEVICE)], want_q, f"fp8 block codes {(n, k)}")
    assert_exact(scale[blocks.to(DEVICE)], want_scale, f"fp8 block scales {(n, k)}")
    deq = quant.dequantize_fp8_block(q, scale)
    assert_exact(deq[rows.to(DEVICE)], ref.dequantize_fp8_block_ref(want_q, want_scale), f"fp8 dequant {(n, k)}")
    packed, block_scale, gs = quant.quantize_nvfp4(w)
    want_gs = _cpu_global_scale(w)
    assert_exact(gs.reshape(1), want_gs.reshape(1), f"nvfp4 global scale {(n, k)}")
    _rows_exact((packed, block_scale, gs), w, ref.quantize_nvfp4_ref, f"nvfp4 {(n, k)}", global_scale=want_gs)
    deq = quant.dequantize_nvfp4(packed, block_scale, gs)
    rd = rows.to(DEVICE)
    assert_exact(deq[rd], ref.dequantize_nvfp4_ref(packed[rd].cpu(), block_scale[rd].cpu(), gs.cpu()), "nvfp4 deq")
    packed, scale = quant.quantize_mxfp4(w)
    _rows_exact((packed, scale), w, ref.quantize_mxfp4_ref, f"mxfp4 {(n, k)}")
    deq = quant.dequantize_mxfp4(packed, scale)
    assert_exact(deq[rd], ref.dequantize_mxfp4_ref(packed[rd].cpu(), scale[rd].cpu()), f"mxfp4 deq {(n, k)}")
    _rows_exact(quant.quantize_int8_per_token(w), w, ref.quantize_int8_per_token_ref, f"int8 channel {(n, k)}")


def test_div_rn_shared_matches_div_rn_gpu():
    """The division every quantizer uses, against div.rn.f32, on 2^26 hard and random pairs."""
    x, d = division_cases(1 << 26, seed=8)
    check_div_rn_shared(x.to(DEVICE), d.to(DEVICE))


def test_fp8_block_ue8m0_and_fp32_weights_gpu():
    w = _weight(576, HIDDEN, seed=6, kinds=ROW_KINDS)  # with the 1e35 rows
    wc = w.cpu()
    want = ref.quantize_fp8_block_ref(wc, ue8m0=True)
    assert_outputs_exact(quant.quantize_fp8_block(w, ue8m0=True), want, "fp8 block ue8m0")
    assert_outputs_exact(quant.quantize_fp8_block(w.float()), ref.quantize_fp8_block_ref(wc.float()), "fp8 block fp32")


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
    assert_outputs_exact(outs[0], outs[1], "outputs over two poisoned pools")


@triton.jit
def _fast_division_kernel(x_ptr, d_ptr, silu_ptr, fp4_ptr, exact_ptr, n, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """SILU: x is a gate, d = 1 + expf(-x); else d is read. Both fast divisions beside tl.div_rn."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    if SILU:
        d = 1.0 + libdevice.exp(-x)
        tl.store(silu_ptr + offs, silu_div(x, d, True, True), mask=mask)
    else:
        d = tl.load(d_ptr + offs, mask=mask, other=1.0)
        tl.store(fp4_ptr + offs, div_rn_shared_unsigned(x, d, tl.div_rn(1.0, d)), mask=mask)
    tl.store(exact_ptr + offs, tl.div_rn(x, d), mask=mask)


def _differing(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return got.view(torch.int32) != want.view(torch.int32)


def test_silu_fast_division_matches_div_rn_on_every_bf16_gate_gpu():
    """silu_div (MUFU.RCP, a Newton step, a Markstein correction, no range check) == div.rn bit for bit on every
    finite bf16 gate >= -85 (the whole bf16 input space of the fast path) and on 2^24 float32 gates: uniform in
    [-85, 90], and +-2^u with u uniform in [-149, 127] (tiny gates, where 1 + exp(-g) = 2)."""
    bf16 = (torch.arange(1 << 16, dtype=torch.int32) << 16).view(torch.float32)
    g = torch.Generator().manual_seed(9)
    n = 1 << 23
    wide = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 276 - 149).float()
    wide = wide * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    gates = torch.cat([bf16, torch.rand(n, generator=g) * 175 - 85, wide])
    gates = gates[torch.isfinite(gates) & (gates >= -85)].to(DEVICE)
    fast, exact = torch.empty_like(gates), torch.empty_like(gates)
    _fast_division_kernel[(triton.cdiv(gates.numel(), 1024),)](gates, gates, fast, fast, exact, gates.numel(),
                                                              SILU=True, BLOCK=1024)
    bad = _differing(fast, exact)
    assert not bool(bad.any()), f"{int(bad.sum())} of {gates.numel()} differ, e.g. gates {gates[bad][:4].tolist()}"


def test_fp4_fast_division_matches_div_rn_gpu():
    """div_rn_shared_unsigned (NVFP4's element division, div_rn_shared without the sign copy) == div.rn where the
    quotient is normal or zero, except that -0 / d gives +0 (code 0 either way)."""
    x, d = division_cases(1 << 24, seed=10)
    x, d = x.to(DEVICE), d.to(DEVICE)
    fast, exact = torch.empty_like(x), torch.empty_like(x)
    _fast_division_kernel[(triton.cdiv(x.numel(), 1024),)](x, d, fast, fast, exact, x.numel(), SILU=False, BLOCK=1024)
    normal = (exact.abs() >= 2.0**-126) & (x != 0)
    bad = normal & _differing(fast, exact)
    assert not bool(bad.any()), f"{int(bad.sum())} of {int(normal.sum())} differ: x={x[bad][:3]} d={d[bad][:3]}"
    assert bool((fast[x == 0] == 0).all()) and not bool(torch.signbit(fast[x == 0]).any())
