"""w4a16_gemm (kernels/gemm/triton_w4a16.py) on weights from to_mma_layout, against the references.

CPU: the Triton interpreter at small shapes, and the kernel compiled for sm_90a (what its layout is for: 16-byte
code loads, the decoded tile already in wgmma's register-operand layout, no spills). GPU (`-m gpu`): DeepSeek
(N, K) shapes at M in {1, 16, 64}.
Thresholds are test_gemm_kernels.py's (its module docstring derives them): the kernel and the reference
see the same FP4 weight, so only accumulation order and the output cast differ. The layout conversion
is checked bit for bit: from_mma_layout(to_mma_layout(w)) == w, and the kernel is compared with the
reference on the stored layout (nvfp4_gemm_ref / mxfp4_gemm_ref), which never sees the rearranged bytes.
"""

from __future__ import annotations

import re

import pytest
import torch
from dsquant.kernels.gemm import mxfp4_gemm_ref, nvfp4_gemm_ref, to_mma_layout, w4a16_gemm, w4a16_gemm_ref
from dsquant.kernels.gemm.fp4_mma_layout import from_mma_layout
from dsquant.kernels.testing import DEEPSEEK_V3_NK, assert_close_global, poison_

from tests.kernels.sm90 import compile_in_child, ptxas_report
from tests.kernels.test_gemm_kernels import (
    BF16_OUT_MAX_DIFF,
    DEVICE,
    FP32_OUT_MAX_DIFF,
    INTERPRET,
    gpu_check,
    operands,
    poison_inputs,
)

FP4 = ("nvfp4", "mxfp4")
REF = {"nvfp4": nvfp4_gemm_ref, "mxfp4": mxfp4_gemm_ref}


def _layout(ops: tuple):
    return to_mma_layout(*ops[1:])  # (w_packed, w_scale[, global_scale])


def _run(fmt: str, ops: tuple, out_dtype=torch.bfloat16, cfg=None):
    x = ops[0]
    out = poison_(torch.empty(x.shape[0], ops[1].shape[0], dtype=out_dtype, device=x.device))
    got = w4a16_gemm(x, _layout(ops), out_dtype=out_dtype, out=out, cfg=cfg)
    assert got.data_ptr() == out.data_ptr(), "the result is not in `out`"
    return got, REF[fmt](*ops, out_dtype=out_dtype)


@pytest.mark.parametrize("fmt", FP4)
@pytest.mark.parametrize("n,k", [(192, 256), (64, 96), (300, 1024)], ids=str)
def test_layout_round_trip_is_exact(fmt, n, k):
    # N and K off the layout's padding (128 rows, 256 K) and on it.
    ops = operands(fmt, 1, n, k, device="cpu")
    back = from_mma_layout(_layout(ops))
    assert torch.equal(back[0], ops[1])
    assert torch.equal(back[1].view(torch.uint8), ops[2].view(torch.uint8))


def test_layout_puts_a_threads_bytes_together():
    # Lane l of a 16-row x 64-K block holds rows l // 4 + {0, 8} and K pairs l % 4 + {0, 4, ..., 28}, byte
    # j = 4 * c + 2 * h + s being row 8 * h + l // 4 and pair 8 * c + 4 * s + l % 4. Two weights tell where each
    # byte came from: one whose bytes are their row, one whose bytes are their K pair.
    rows, pairs = torch.meshgrid(torch.arange(16), torch.arange(32), indexing="ij")
    scale = torch.zeros(16, 4, dtype=torch.uint8).view(torch.float8_e4m3fn)
    row_of = to_mma_layout(rows.to(torch.uint8), scale, torch.ones(())).packed[0, 0].reshape(32, 16)
    pair_of = to_mma_layout(pairs.to(torch.uint8), scale, torch.ones(())).packed[0, 0].reshape(32, 16)
    for lane in range(32):
        where = [(8 * h + lane // 4, 8 * c + 4 * s + lane % 4) for c in range(4) for h in range(2) for s in range(2)]
        assert list(zip(row_of[lane].tolist(), pair_of[lane].tolist())) == where, f"lane {lane}"


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("m", [1, 5, 16, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("fmt", FP4)
def test_w4a16_gemm_matches_reference(fmt, m):
    # N = 192: 1.5 row tiles of 128 (as 2112 and 576); K = 320: a K past the 256 of the padded layout.
    got, want = _run(fmt, operands(fmt, m, 192, 320))
    assert_close_global(got, want, BF16_OUT_MAX_DIFF, f"{fmt} {m=}")


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=1),
        dict(BLOCK_N=64, BLOCK_K=64, SPLIT_K=3),
        dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=2),
        dict(BLOCK_N=64, BLOCK_K=64, SPLIT_K=3, FUSED_SUM=False),
        dict(BLOCK_N=64, BLOCK_K=64, SPLIT_K=5),
    ],
    ids=str,
)
@pytest.mark.parametrize("fmt", FP4)
def test_w4a16_gemm_tiles_and_splits_fp32_out(fmt, cfg):
    # Every tile the layout allows, split and unsplit K (an uneven split: 5 K steps of 64 in 3; 5 splits: the
    # in-kernel sum's second group of four), the split sum in the kernel and in a second one, fp32 output.
    cfg = dict(cfg, BLOCK_M=16, num_warps=4, num_stages=2)
    got, want = _run(fmt, operands(fmt, 7, 256, 320), torch.float32, cfg)
    assert_close_global(got, want, FP32_OUT_MAX_DIFF, f"{fmt} {cfg}")
    assert_close_global(
        got,
        w4a16_gemm_ref(operands(fmt, 7, 256, 320)[0], _layout(operands(fmt, 7, 256, 320)), torch.float32),
        FP32_OUT_MAX_DIFF,
        "w4a16_gemm_ref",
    )


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
def test_w4a16_gemm_split_sum_rearms_and_repeats():
    # Two token tiles x three row tiles x eight K splits: every counter is back at zero after a call, a second
    # call (whichever split finishes last) gives the same bits, and so does the two-launch sum (both in split order).
    ops = operands("nvfp4", 40, 192, 512)
    w = _layout(ops)
    cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, SPLIT_K=8, num_warps=4, num_stages=2)
    first = w4a16_gemm(ops[0], w, cfg=cfg)
    assert not w.counters.any(), f"counters left armed: {w.counters.nonzero().flatten().tolist()}"
    assert torch.equal(w4a16_gemm(ops[0], w, cfg=cfg), first)
    assert torch.equal(w4a16_gemm(ops[0], w, cfg=dict(cfg, FUSED_SUM=False)), first)
    assert_close_global(first, nvfp4_gemm_ref(*ops), BF16_OUT_MAX_DIFF, "split sum")


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("fmt", FP4)
def test_w4a16_gemm_nan_inf_pattern(fmt):
    ops = poison_inputs(fmt, operands(fmt, 4, 192, 256))
    got, want = _run(fmt, ops)
    assert torch.isnan(want).any(), "the poisoned inputs should give NaN outputs"
    assert_close_global(got, want, BF16_OUT_MAX_DIFF, f"{fmt} with NaN/Inf")


@pytest.mark.parametrize(
    "what,message", [("dtype", "bfloat16"), ("k", "K=128, the weight K=256"), ("m", "M=65"), ("scale", "w_scale")]
)
def test_w4a16_gemm_rejects_bad_inputs(what, message):
    x, w, s, g = operands("nvfp4", 4, 128, 256, device="cpu")
    with pytest.raises(AssertionError, match=message):
        if what == "scale":
            to_mma_layout(w, s[:, :-1], g)
        layout = to_mma_layout(w, s, g)
        if what == "dtype":
            w4a16_gemm(x.float(), layout)
        if what == "k":
            w4a16_gemm(x[:, :128], layout)
        if what == "m":
            w4a16_gemm(torch.zeros(65, 256, dtype=torch.bfloat16), layout)


def _wgmma_a_layout(k_width: int) -> str:
    """wgmma's register A operand for bf16, 64 rows x k_width K per warpgroup, as a Triton linear layout: warp w,
    lane t and register i hold row 16 w + t // 4 + 8 ((i // 2) % 2), column 2 (t % 4) + i % 2 + 8 ((i // 4) % 2)
    + 16 (i // 8) (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts" for wgmma .m64nNk16, one 16-K
    fragment after another)."""

    def at(w: int, t: int, i: int) -> list[int]:
        return [16 * w + t // 4 + 8 * ((i // 2) % 2), 2 * (t % 4) + i % 2 + 8 * ((i // 4) % 2) + 16 * (i // 8)]

    reg = [at(0, 0, 1 << b) for b in range(3 + (k_width // 16).bit_length() - 1)]
    lane, warp = [at(0, 1 << b, 0) for b in range(5)], [at(1, 0, 0), at(2, 0, 0)]
    return f"register = {reg}, lane = {lane}, warp = {warp}, block = []"


@pytest.mark.parametrize("fmt", FP4)
def test_decoded_tile_is_already_the_mma_operand_sm90(fmt, tmp_path):
    # No GPU needed: Triton compiles for sm_90a. What the layout is for: each thread loads its codes as 16 bytes
    # and the decoded weight reaches wgmma's register operand with no data movement, so every layout conversion
    # into that operand starts from the operand's own layout (a renaming of registers); and ptxas does not spill.
    code = (
        "import sys; from dsquant.kernels.gemm.triton_w4a16 import compile_sm90; "
        "k = compile_sm90(sys.argv[1] == 'nvfp4'); "
        "[open(sys.argv[2] + '.' + ext, 'w').write(k.asm[ext]) for ext in ('ttgir', 'ptx')]"
    )
    compile_in_child(code, fmt, str(tmp_path / "k"))
    ttgir = (tmp_path / "k.ttgir").read_text()
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.linear<\{(.*)\}>$", ttgir, re.M))
    operand = r"tensor<64x\d+xbf16, #ttg\.dot_op<\{opIdx = 0"
    assert re.search(r"ttng\.warp_group_dot %\S+, %\S+, .*: " + operand, ttgir), "wgmma's A operand is not in registers"
    # (the compiler may issue the MMA 16 K at a time or over a wider K slice of the tile)
    sources = re.findall(r"ttg\.convert_layout %\S+ : tensor<64x(\d+)xbf16, (#\w+)> -> " + operand, ttgir)
    moved = {src: layouts.get(src) for width, src in sources if layouts.get(src) != _wgmma_a_layout(int(width))}
    assert not moved, f"the decoded tile is converted into the MMA operand from {moved}, not wgmma's layout"
    # The codes reach registers 16 bytes a thread: a layout that does not match the MMA's makes Triton gather them
    # from shared memory byte by byte instead.
    gathered = re.findall(r"ld\.shared(?:\.v\d)?\.[bus]8\b", (tmp_path / "k.ptx").read_text())
    assert not gathered, f"{len(gathered)} byte-wide shared-memory loads: the weight codes are gathered"
    log = ptxas_report(tmp_path / "k.ptx")
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log


# ---------------------------------------------------------------- GPU (an H100)

_WEIGHTS: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("m", (1, 16, 64), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("fmt,n,k", [(f, n, k) for f in FP4 for n, k in DEEPSEEK_V3_NK], ids=str)
def test_w4a16_gemm_deepseek_shapes_gpu(fmt, n, k, m):
    if (fmt, n, k) not in _WEIGHTS:
        _WEIGHTS.clear()  # one weight at a time
        ops = operands(fmt, 1, n, k, device="cuda", seed=1)
        _WEIGHTS[(fmt, n, k)] = (ops[1:], _layout(ops))
    stored, layout = _WEIGHTS[(fmt, n, k)]
    ops = operands(fmt, m, n, k, device="cuda", weight=stored)
    gpu_check(w4a16_gemm(ops[0], layout), REF[fmt](*ops), BF16_OUT_MAX_DIFF, f"{fmt} {m=} {n=} {k=}")
