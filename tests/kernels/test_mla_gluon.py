"""mla_decode's Gluon kernel for fp8 caches at <= 16 heads (kernels/mla/gluon_decode.py) against mla_decode_ref.

Gluon compiles only for the GPU, so the kernel itself is tested on an H100 (`-m gpu`) at DeepSeek-V3
shapes (page 64, 16 heads = TP8, 5 heads for a partial head block), over a 32K context with many splits,
and against the portable Triton config, with test_mla_attention.py's threshold (its module docstring
derives it). CPU: where the kernel cannot run (interpreter, no Hopper, prefill) the default config
falls back to the portable one and gives the same numbers.
"""

from __future__ import annotations

import re

import pytest
import torch
from dsquant.kernels.gemm import configs as gemm_configs
from dsquant.kernels.mla import gluon_decode, mla_decode, mla_decode_ref, mla_prefill, mla_prefill_ref
from dsquant.kernels.mla.configs import GLUON_CONFIG, portable_config
from dsquant.kernels.testing import assert_close_global

from tests.kernels.sm90 import compile_in_child, ptxas_report
from tests.kernels.test_mla_attention import MAX_DIFF, SCALE, _q, make_cache

FP8_KINDS = ["fp8", "fp8_ds"]


def _decode(kind, lens, heads, page_size=16, **kw):
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, lens, page_size=page_size)
    qn, qp = _q(len(lens), heads)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, **kw)
    want = mla_decode_ref(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    return got, want


def test_gluon_api_probe_is_one_line():
    missing = gluon_decode.gluon_missing()
    assert missing is None or ("\n" not in missing and "triton" in missing), missing


def test_gluon_never_runs_on_cpu():
    assert not gluon_decode.gluon_runs_on(torch.device("cpu"))


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_gluon_config_falls_back_where_it_cannot_run(kind):
    # Here (interpreter / CPU) the Gluon config runs the portable kernel: same numbers as asking for it.
    if gluon_decode.gluon_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the Gluon kernel runs here (tested below)")
    lens = [64, 23]
    got, want = _decode(kind, lens, 16, num_splits=1, config=GLUON_CONFIG)
    assert_close_global(got, want, MAX_DIFF, f"fallback {kind=}")
    port, _ = _decode(kind, lens, 16, num_splits=1, config=portable_config(16, kind))
    assert torch.equal(got, port)


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_gluon_config_prefill_runs_the_portable_kernel(kind):
    # Prefill has several query rows per sequence, which the decode-only Gluon kernel does not take.
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, [32, 20])
    qsl = torch.tensor([0, 5, 9], dtype=torch.int32, device=lens_t.device)
    qn, qp = _q(9, 16)
    got = mla_prefill(qn, qp, cache, bt, lens_t, qsl, SCALE, kv_scale=kv_scale, config=GLUON_CONFIG)
    want = mla_prefill_ref(qn, qp, cache, bt, lens_t, qsl, SCALE, kv_scale=kv_scale, out_dtype=torch.float32)
    assert_close_global(got, want, MAX_DIFF, f"prefill {kind=}")


# ---- GPU: the kernel itself (Hopper)


def _needs_gluon():
    assert gluon_decode.gluon_runs_on(torch.device("cuda")), (
        f"Gluon decode cannot run: capability {torch.cuda.get_device_capability()}, {gluon_decode.gluon_missing()}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("kind", FP8_KINDS)
@pytest.mark.parametrize("heads", [16, 5], ids=["H16", "H5"])
@pytest.mark.parametrize("num_splits", [1, None], ids=["s1", "auto"])
@pytest.mark.parametrize("page_size", [64, 16])
def test_gluon_decode_v3_shapes_gpu(kind, heads, num_splits, page_size):
    _needs_gluon()
    g = torch.Generator().manual_seed(heads)
    lens = torch.randint(1, 4097, (16,), generator=g).tolist()
    lens[0], lens[1], lens[2] = 1, 4096, 65  # one token, whole tiles, one token past a tile
    got, want = _decode(kind, lens, heads, page_size=page_size, num_splits=num_splits, config=GLUON_CONFIG)
    assert_close_global(got, want, MAX_DIFF, f"gluon decode {kind=} {heads=} {num_splits=} {page_size=}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", FP8_KINDS)
def test_gluon_decode_long_context_gpu(kind):
    # >= 32K tokens: many splits and the LSE merge over them; a short row and an empty row beside it.
    _needs_gluon()
    got, want = _decode(kind, [32768 + 77, 1500, 0], 16, page_size=64, config=GLUON_CONFIG)
    assert bool((got[2] == 0).all())
    assert_close_global(got, want, MAX_DIFF, f"gluon decode 32K {kind=}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", FP8_KINDS)
def test_gluon_decode_matches_portable_kernel_gpu(kind):
    # Same float16 arithmetic as the portable kernel (exact E4M3 images, q and P scaled by powers of two):
    # the two differ only in float32 summation order.
    _needs_gluon()
    cache, bt, lens_t, kv_scale, _ = make_cache(kind, [3000, 17, 1024, 2049], page_size=64)
    qn, qp = _q(4, 16)
    got = mla_decode(qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32, config=GLUON_CONFIG)
    port = mla_decode(
        qn, qp, cache, bt, lens_t, SCALE, kv_scale=kv_scale, out_dtype=torch.float32, config=portable_config(16, kind)
    )
    assert_close_global(got, port, 1e-6, f"gluon vs portable {kind=}")


def _ptxas_log(kind: str, tmp_path) -> str:
    """ptxas's report on the kernel compiled for sm_90a (no GPU); asserts it fits the shared memory."""
    ptx = tmp_path / f"{kind}.ptx"
    code = ("import sys; from dsquant.kernels.mla import gluon_decode as G; k = G.compile_sm90(sys.argv[1]); "
            "open(sys.argv[2], 'w').write(k.asm['ptx']); print(k.metadata.shared)")
    shared = int(compile_in_child(code, kind, str(ptx)).split()[-1])
    assert shared <= gemm_configs.SMEM_BYTES, f"{shared} bytes of shared memory"
    return ptxas_report(ptx)


@pytest.mark.skipif(gluon_decode.gluon_missing() is not None, reason="this Triton lacks the Gluon API")
def test_kernel_compiles_for_sm90_without_spills_on_fp8(tmp_path):
    # The point of the converter partition: the MMA warpgroup keeps its accumulators and the converter its
    # words in flight without spilling (one warpgroup doing both spilled). fp8_ds's per-group scales spill a
    # little in the MMA partition; it has to compile and fit.
    log = _ptxas_log("fp8", tmp_path)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log
    _ptxas_log("fp8_ds", tmp_path)
