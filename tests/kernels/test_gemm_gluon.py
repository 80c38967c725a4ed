"""fp8_block_gemm_gluon (kernels/gemm/gluon_fp8.py) against fp8_block_gemm_ref.

Gluon kernels compile only for the GPU, so the kernel itself is tested on an H100 (`-m gpu`): DeepSeek
(N, K) shapes at M in {128, 2048, 4096}, plus the tile edges (partial M and N tiles, one or an odd
number of 128-K steps, more tiles than SMs), fp32 output, a column-major activation-scale view and
NaN/Inf propagation, with the thresholds of test_gemm_kernels.py (its module docstring derives them).
CPU: the module imports on any Triton, the argument checks and the "cannot run here" errors are one
clear line, and M <= 64 runs the existing kernel (under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from dsquant.kernels.gemm import configs, fp8_block_gemm, fp8_block_gemm_ref
from dsquant.kernels.gemm import gluon_fp8 as G
from dsquant.kernels.testing import DEEPSEEK_V3_NK, assert_close_global, poison_

from tests.kernels.sm90 import compile_in_child, ptxas_report
from tests.kernels.test_gemm_kernels import (
    BF16_OUT_MAX_DIFF,
    FP32_OUT_MAX_DIFF,
    gpu_check,
    operands,
    poison_inputs,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------- CPU


def test_gluon_api_probe_is_one_line():
    missing = G.gluon_missing()
    assert missing is None or ("\n" not in missing and "triton" in missing), missing


@pytest.fixture
def fresh_capability_check():
    """gluon_missing() is cached per process; a test that changes what it inspects sees a fresh answer, and
    the next test the real one."""
    G.gluon_missing.cache_clear()
    yield
    G.gluon_missing.cache_clear()


def test_wrapper_says_when_triton_lacks_gluon(monkeypatch, fresh_capability_check):
    monkeypatch.setattr(G, "_IMPORT_ERROR", "ImportError: cannot import name 'warpgroup_mma'")
    a, a_s, b, b_s = operands("fp8", 128, 128, 256, device="cpu")
    with pytest.raises(RuntimeError, match="lacks the Gluon Hopper API.*warpgroup_mma.*use fp8_block_gemm"):
        G.fp8_block_gemm_gluon(a, a_s, b, b_s)


@pytest.mark.skipif(G.gluon is None, reason="this Triton has no Gluon to change")
def test_wrapper_says_when_gluon_api_differs(monkeypatch, fresh_capability_check):
    def warpgroup_mma_wait(pendings=0, tensors=None):  # a renamed signature
        pass

    monkeypatch.setattr(G, "warpgroup_mma_wait", warpgroup_mma_wait)
    a, a_s, b, b_s = operands("fp8", 128, 128, 256, device="cpu")
    with pytest.raises(RuntimeError, match=r"warpgroup_mma_wait\('pendings', 'tensors'\) lacks"):
        G.fp8_block_gemm_gluon(a, a_s, b, b_s)


@pytest.mark.skipif(G.gluon_missing() is not None, reason="this Triton lacks the Gluon API (tested above)")
def test_wrapper_refuses_a_non_hopper_device():
    a, a_s, b, b_s = operands("fp8", 128, 128, 256, device="cpu")
    with pytest.raises(RuntimeError, match=r"Hopper \(sm_90\) only, got cpu"):
        G.fp8_block_gemm_gluon(a, a_s, b, b_s)


def _bad(what: str) -> tuple:
    a, a_s, b, b_s = operands("fp8", 128, 128, 256, device="cpu")
    if what == "dtype":
        a = a.float()
    elif what == "a_scale_shape":
        a_s = a_s[:, :1]
    elif what == "b_scale_dtype":
        b_s = b_s.double()
    elif what == "k_mismatch":
        a, a_s = a[:, :128], a_s[:, :1]
    return a, a_s, b, b_s


@pytest.mark.parametrize("what,message", [("dtype", "float8_e4m3fn operands expected"),
                                          ("a_scale_shape", "a_scale .* expected float32"),
                                          ("b_scale_dtype", "b_scale torch.float64"),
                                          ("k_mismatch", "shapes")])
def test_wrapper_rejects_bad_operands(what, message):
    with pytest.raises(AssertionError, match=message):
        G.fp8_block_gemm_gluon(*_bad(what))


def test_wrapper_rejects_k_not_multiple_of_128_and_bad_out():
    a, a_s, b, b_s = operands("fp8", 128, 128, 256, device="cpu")
    with pytest.raises(AssertionError, match="multiple of 128"):
        G.fp8_block_gemm_gluon(a[:, :192], a_s[:, :2], b[:, :192], b_s[:, :2])
    with pytest.raises(AssertionError, match=r"out must be \[M, N\] = \(128, 128\)"):
        G.fp8_block_gemm_gluon(a, a_s, b, b_s, out=torch.empty(128, 64, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="out_dtype torch.int32"):
        G.fp8_block_gemm_gluon(a, a_s, b, b_s, out_dtype=torch.int32)


@pytest.mark.skipif(not INTERPRET, reason="runs the existing Triton kernel under TRITON_INTERPRET=1")
def test_small_m_runs_the_existing_kernel():
    ops = operands("fp8", configs.SMALL_M_MAX, 192, 256, device="cpu")
    assert torch.equal(G.fp8_block_gemm_gluon(*ops), fp8_block_gemm(*ops))


@pytest.mark.parametrize("capability,gluon_ok,m,want", [((9, 0), True, configs.GLUON_MIN_M, True),
                                                          ((9, 0), True, configs.GLUON_MIN_M - 1, False),
                                                          ((10, 0), True, 4096, False), ((8, 9), True, 4096, False),
                                                          ((9, 0), False, 4096, False)], ids=str)
def test_fp8_block_gemm_takes_gluon_on_hopper_from_min_m(monkeypatch, capability, gluon_ok, m, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(G, "gluon_missing", lambda: None if gluon_ok else "this Triton lacks the Gluon Hopper API")
    assert G.dispatches_to_gluon(m, torch.device("cuda")) is want
    assert G.dispatches_to_gluon(m, torch.device("cpu")) is False


@pytest.mark.parametrize("m", [configs.GLUON_MIN_M - 1, configs.GLUON_MIN_M], ids=lambda m: f"M{m}")
def test_fp8_block_gemm_routes_by_dispatch_rule(monkeypatch, m):
    # fp8_block_gemm passes its arguments unchanged to the kernel the rule names.
    calls = []
    monkeypatch.setattr(G, "dispatches_to_gluon", lambda rows, device: rows >= configs.GLUON_MIN_M)
    monkeypatch.setattr(G, "fp8_block_gemm_gluon", lambda *args: calls.append(("gluon", args)))
    monkeypatch.setattr(G, "fp8_block_gemm_triton", lambda *args: calls.append(("triton", args)))
    a, a_s, b, b_s = torch.empty(m, 128, dtype=torch.float8_e4m3fn), torch.ones(m, 1), torch.empty(128, 128), None
    fp8_block_gemm(a, a_s, b, b_s, torch.float32, None)
    assert calls == [("gluon" if m >= configs.GLUON_MIN_M else "triton", (a, a_s, b, b_s, torch.float32, None))]


# ---------------------------------------------------------------- GPU (an H100)

_WEIGHTS: dict = {}


def _ops(m: int, n: int, k: int) -> tuple:
    if (n, k) not in _WEIGHTS:
        _WEIGHTS.clear()  # one weight at a time: the largest is 264M elements
        _WEIGHTS[(n, k)] = operands("fp8", 1, n, k, device="cuda", seed=1)[2:]
    return operands("fp8", m, n, k, device="cuda", weight=_WEIGHTS[(n, k)])


def _check(ops: tuple, out_dtype: torch.dtype, max_diff: float, what: str) -> None:
    out = poison_(torch.empty(ops[0].shape[0], ops[2].shape[0], dtype=out_dtype, device="cuda"))
    got = G.fp8_block_gemm_gluon(*ops, out=out)
    assert got.data_ptr() == out.data_ptr(), f"{what}: the result is not in `out`"
    gpu_check(got, fp8_block_gemm_ref(*ops, out_dtype=out_dtype), max_diff, what)


@pytest.mark.gpu
@pytest.mark.parametrize("m", (128, 2048, 4096), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n,k", DEEPSEEK_V3_NK, ids=str)
def test_gluon_gemm_deepseek_shapes_gpu(n, k, m):
    assert G.gluon_missing() is None, G.gluon_missing()
    _check(_ops(m, n, k), torch.bfloat16, BF16_OUT_MAX_DIFF, f"gluon {m=} {n=} {k=}")


@pytest.mark.gpu
def test_fp8_block_gemm_runs_gluon_on_hopper_gpu():
    assert G.dispatches_to_gluon(configs.GLUON_MIN_M, torch.device("cuda")), G.gluon_missing()
    ops = _ops(configs.GLUON_MIN_M, 2112, 7168)
    assert torch.equal(fp8_block_gemm(*ops), G.fp8_block_gemm_gluon(*ops))
    assert_close_global(fp8_block_gemm(*ops), fp8_block_gemm_ref(*ops), BF16_OUT_MAX_DIFF, "dispatched")


# M = 200: a partial row tile, and the second warpgroup's rows partly past M; N = 192: a partial column tile;
# K = 128 / 384 / 640: one and an odd number of K steps (the main loop runs K steps in pairs).
EDGES = [(200, 192, 128), (200, 192, 384), (65, 576, 640), (1000, 2112, 1024), (130, 4096, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m,n,k", EDGES, ids=str)
def test_gluon_gemm_tile_edges_gpu(m, n, k, out_dtype):
    max_diff = FP32_OUT_MAX_DIFF if out_dtype == torch.float32 else BF16_OUT_MAX_DIFF
    _check(operands("fp8", m, n, k, device="cuda"), out_dtype, max_diff, f"gluon {m=} {n=} {k=} {out_dtype}")


@pytest.mark.gpu
def test_gluon_gemm_column_major_scale_gpu():
    a, a_s, b, b_s = operands("fp8", 300, 640, 1024, device="cuda")
    a_s_col = a_s.t().contiguous().t()  # [M, K/128] view of a [K/128, M] buffer (DeepGEMM / cuBLAS layout)
    _check((a, a_s_col, b, b_s), torch.float32, FP32_OUT_MAX_DIFF, "column-major a_scale")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [70, 256], ids=lambda m: f"M{m}")
def test_gluon_gemm_nan_inf_pattern_gpu(m):
    ops = poison_inputs("fp8", operands("fp8", m, 384, 512, device="cuda"))
    got, want = G.fp8_block_gemm_gluon(*ops), fp8_block_gemm_ref(*ops)
    assert torch.isnan(want).any(), "the poisoned inputs should give NaN outputs"
    assert_close_global(got, want, BF16_OUT_MAX_DIFF, f"gluon {m=} with NaN/Inf")



@pytest.mark.skipif(G.gluon_missing() is not None, reason="this Triton lacks the Gluon API (tested above)")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernel_compiles_for_sm90_without_spills_or_serialized_wgmma(out_dtype, tmp_path):
    # No GPU needed: Triton compiles for sm_90a and its ptxas reports what it made of the schedule. The
    # overlap of MMA and promotion is lost without an error when ptxas serializes the wgmmas (it does when an
    # in-flight accumulator is copied), and spills would cost the register budgets their point.
    ptx = tmp_path / "kernel.ptx"
    code = ("import sys, torch; from dsquant.kernels.gemm import gluon_fp8 as G; "
            "k = G.compile_sm90(getattr(torch, sys.argv[1])); open(sys.argv[2], 'w').write(k.asm['ptx']); "
            "print(k.metadata.shared)")
    shared = int(compile_in_child(code, str(out_dtype).split(".")[1], str(ptx)).split()[-1])
    assert shared <= configs.SMEM_BYTES, f"{shared} bytes of shared memory"
    log = ptxas_report(ptx)
    assert "serialized" not in log, log
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log
