"""fp8_block_gemm's paired-K variant (PAIR_K: two MMAs issued before either promotion), opt-in until timed.

It adds the same products in the same order as the one-step loop, so on the interpreter the two must agree
bit for bit, odd K-tile counts included (the last step then runs in the one-step loop). On the GPU it is
checked against the reference with the fp32-output threshold of test_gemm_kernels.py (1e-6, derived there).
"""

from __future__ import annotations

import os

import pytest
import torch
from dsquant.kernels.testing import assert_exact, calc_diff, poison_

from dsquant.formats import quantize_fp8_block, quantize_fp8_per_token_group

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
FP32_OUT_MAX_DIFF = 1e-6

from dsquant.kernels.gemm import configs, fp8_block_gemm_ref  # noqa: E402
from dsquant.kernels.gemm.triton import _launch  # noqa: E402

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")


def _operands(m: int, n: int, k: int, device) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(k)
    x = torch.randn(m, k, generator=g) * torch.randn(1, k // 128, generator=g).exp().repeat_interleave(128, 1)
    w = torch.randn(n, k, generator=g) * torch.randn(-(-n // 128), k // 128, generator=g).exp().repeat_interleave(
        128, 1).repeat_interleave(128, 0)[:n]
    return (*(t.to(device) for t in quantize_fp8_per_token_group(x)), *(t.to(device) for t in quantize_fp8_block(w)))


def _gemm(ops, cfg: dict) -> torch.Tensor:
    a, a_s, w, w_s = ops
    out = poison_(torch.empty(a.shape[0], w.shape[0], dtype=torch.float32, device=a.device))
    return _launch(a, w, torch.float32, configs.FP8_BLOCK, a_scale=a_s, w_scale=w_s, out=out, small_m=False,
                   large_cfg=cfg)


TILE = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)


@pytest.mark.parametrize("k", [512, 640], ids=lambda k: f"K{k}")  # 4 and 5 K tiles
def test_pair_k_adds_the_same_products_in_the_same_order(k):
    ops = _operands(70, 192, k, DEVICE)  # a partial M tile and a partial N tile (1.5 blocks)
    paired = _gemm(ops, TILE | dict(PAIR_K=True))
    single = _gemm(ops, TILE | dict(PAIR_K=False))
    if INTERPRET:
        assert_exact(paired, single, f"PAIR_K vs one step, {k=}")
    d = calc_diff(paired, fp8_block_gemm_ref(*ops, out_dtype=torch.float32))
    assert d <= FP32_OUT_MAX_DIFF, f"PAIR_K {k=}: calc_diff={d:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(24576, 1536), (7168, 2048), (2112, 7168), (4096, 7168)], ids=str)
def test_pair_k_deepseek_shapes_gpu(n, k):
    ops = _operands(2048, n, k, "cuda")
    for tile in (TILE, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)):
        got = _gemm(ops, tile | dict(PAIR_K=True))
        want = fp8_block_gemm_ref(*ops, out_dtype=torch.float32)
        assert not torch.isnan(got).any()
        d = calc_diff(got, want)
        assert d <= FP32_OUT_MAX_DIFF, f"PAIR_K {n=} {k=} {tile}: calc_diff={d:.3e}"
