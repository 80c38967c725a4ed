"""Scaled-mm GEMM kernels against their pure-torch references.

CPU: the Triton interpreter (TRITON_INTERPRET=1) at small shapes. GPU (`-m gpu`): DeepSeek (N, K)
shapes, M in {1, 16, 64, 128, 2048, 4096}.

Thresholds. Kernel and reference see the same quantized operands, so the only differences are
accumulation order and the output cast:
- BF16_OUT_MAX_DIFF = 1e-5: both outputs are rounded to bf16 (8 significant bits, relative
  half-ulp up to 2^-8). Even if they disagreed by that on every element, calc_diff ~ E[d^2] / 2
  <= 2^-16 / 6 ~ 2.5e-6; 1e-5 leaves 4x. A wrong scale group, a dropped K tile or a wrong nibble
  order measured 1e-3 .. 1 here.
- W4A8_MAX_DIFF = 1e-3: mxfp4_gemm from configs.W4A8_MIN_M rows on rounds the bf16 activations to
  FP8 (1x128 groups) before the MMA, which the bf16-activation reference does not. E4M3 keeps 4
  significant bits: relative error uniform within half an ulp, E[d^2] ~ 2^-8 * 0.54 / 3 ~ 7e-4
  (log-uniform mantissas), so calc_diff ~ E[d^2] / 2 ~ 3.5e-4; 1e-3 is DeepGEMM's FP8 bound too.
- FP32_OUT_MAX_DIFF = 1e-6: no output rounding; what is left is fp32 accumulation and, on Hopper,
  the FP8 MMA's truncated in-MMA accumulation (about 14 bits, DeepSeek-V3 report sec. 3.3.2), i.e.
  d <~ 2^-14 and calc_diff <~ 2^-28 / 2 ~ 2e-9 per 128-K group; 1e-6 leaves a wide margin while
  every bug above still fails by 1000x.
"""

from __future__ import annotations

import os

import pytest
import torch
from dsquant.kernels.testing import DEEPSEEK_V3_NK, assert_close_global, calc_diff, poison_

from dsquant.formats import (
    dequantize_fp8_per_token_group,
    dequantize_mxfp4,
    quantize_fp8_block,
    quantize_fp8_per_token_group,
    quantize_int8_per_channel,
    quantize_int8_per_token,
    quantize_mxfp4,
    quantize_nvfp4,
)

BF16_OUT_MAX_DIFF = 1e-5
W4A8_MAX_DIFF = 1e-3
FP32_OUT_MAX_DIFF = 1e-6
FORMATS = ("fp8", "int8", "nvfp4", "mxfp4")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


from dsquant.kernels import format_codes  # noqa: E402
from dsquant.kernels.gemm import (  # noqa: E402
    configs,
    fp8_block_gemm,
    fp8_block_gemm_ref,
    int8_scaled_mm,
    int8_scaled_mm_ref,
    mxfp4_gemm,
    mxfp4_gemm_ref,
    nvfp4_gemm,
    nvfp4_gemm_ref,
)
from dsquant.kernels.gemm.triton import launch_gemm  # noqa: E402
from dsquant.kernels.gemm.triton_fp4 import mxfp4_gemm_w4a8, mxfp4_gemm_w4a8_quantized  # noqa: E402

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
KERNELS = {
    "fp8": (fp8_block_gemm, fp8_block_gemm_ref),
    "int8": (int8_scaled_mm, int8_scaled_mm_ref),
    "nvfp4": (nvfp4_gemm, nvfp4_gemm_ref),
    "mxfp4": (mxfp4_gemm, mxfp4_gemm_ref),
}
FMT_ID = {"fp8": format_codes.FP8_BLOCK, "int8": format_codes.INT8, "nvfp4": format_codes.NVFP4,
          "mxfp4": format_codes.MXFP4}


def _varied(rows: int, cols: int, block: int, device) -> torch.Tensor:
    """randn [rows, cols] with a different magnitude per block x block tile, so that a kernel reading
    the wrong scale group (or the wrong row of them) is far off, not off by a constant."""
    g = torch.randn(-(-rows // block), -(-cols // block), device=device).exp()
    g = g.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return torch.randn(rows, cols, device=device) * g


def _weight(fmt: str, n: int, k: int, device) -> tuple:
    w = _varied(n, k, 128 if fmt == "fp8" else 16, device)
    if fmt == "fp8":
        return quantize_fp8_block(w)
    if fmt == "int8":
        return quantize_int8_per_channel(w)
    if fmt == "nvfp4":
        return quantize_nvfp4(w)
    return quantize_mxfp4(w)


def operands(fmt: str, m: int, n: int, k: int, device=DEVICE, seed: int = 0, weight: tuple | None = None) -> tuple:
    """Positional arguments shared by the kernel and its reference."""
    torch.manual_seed(seed)
    x = _varied(m, k, 128, device)
    w = weight if weight is not None else _weight(fmt, n, k, device)
    if fmt == "fp8":
        return (*quantize_fp8_per_token_group(x), *w)
    if fmt == "int8":
        return (*quantize_int8_per_token(x), *w, torch.randn(n, device=device))
    return (x.bfloat16(), *w)


def launch_kwargs(fmt: str, ops: tuple) -> tuple:
    """operands() -> (a, w, kwargs) for triton.launch_gemm, which can force a path and tile."""
    if fmt == "fp8":
        a, a_s, w, w_s = ops
        return a, w, dict(a_scale=a_s, w_scale=w_s)
    if fmt == "int8":
        a, a_s, w, w_s, bias = ops
        return a, w, dict(a_scale=a_s, w_scale=w_s, bias=bias)
    if fmt == "nvfp4":
        x, w, bs, gs = ops
        return x, w, dict(w_scale=bs, global_scale=gs.reshape(1))
    x, w, s = ops
    return x, w, dict(w_scale=s)


def _run(fmt, ops, out_dtype=torch.bfloat16, poison=True):
    kernel, ref = KERNELS[fmt]
    m, n = ops[0].shape[0], ops[2].shape[0] if fmt in ("fp8", "int8") else ops[1].shape[0]
    out = poison_(torch.empty(m, n, dtype=out_dtype, device=ops[0].device)) if poison else None
    got = kernel(*ops, out_dtype=out_dtype, out=out)
    return got, ref(*ops, out_dtype=out_dtype)


@pytest.mark.parametrize("m", [1, 3, 17, 128], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_matches_reference(fmt, m):
    # N = 192 is 1.5 blocks of 128 (like 2112 and 576); M = 128 takes the persistent kernel.
    got, want = _run(fmt, operands(fmt, m, 192, 256))
    assert_close_global(got, want, BF16_OUT_MAX_DIFF, f"{fmt} {m=}")


SMALL_TILES = {
    "split1": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2),
    "split3": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=3, num_warps=4, num_stages=2),
}


@pytest.mark.parametrize("path", ["large", *SMALL_TILES])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_paths_fp32_out(fmt, path):
    # Both kernels at the same M, fp32 output (no bf16 rounding to hide behind); split3 gives a
    # last split shorter than the others (4 K tiles over 3 splits) and a partial N tile.
    ops = operands(fmt, 20, 192, 512)
    a, w, kw = launch_kwargs(fmt, ops)
    out = poison_(torch.empty(20, 192, dtype=torch.float32, device=a.device))
    small = path != "large"
    launch_gemm(a, w, torch.float32, FMT_ID[fmt], out=out, small_m=small, small_cfg=SMALL_TILES.get(path), **kw)
    assert_close_global(out, KERNELS[fmt][1](*ops, out_dtype=torch.float32), FP32_OUT_MAX_DIFF, f"{fmt} {path}")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [5, 70], ids=lambda m: f"M{m}")
def test_fp4_gemm_partial_k_tile(fmt, m):
    # K = 96 is not a multiple of any BLOCK_K (64, 128, 256): the packed tail and its scales must read as 0.
    got, want = _run(fmt, operands(fmt, m, 64, 96))
    assert_close_global(got, want, BF16_OUT_MAX_DIFF, f"{fmt} {m=} K=96")


def test_fp8_block_gemm_column_major_scale():
    a, a_s, b, b_s = operands("fp8", 17, 192, 384)
    a_s_col = a_s.t().contiguous().t()  # [M, K/128] view of a [K/128, M] buffer (DeepGEMM / cuBLAS layout)
    assert a_s_col.stride() == (1, 17)
    for m_path in (True, False):
        got = launch_gemm(a, b, torch.bfloat16, format_codes.FP8_BLOCK, a_scale=a_s_col, w_scale=b_s, small_m=m_path)
        assert_close_global(got, fp8_block_gemm_ref(a, a_s, b, b_s), BF16_OUT_MAX_DIFF, f"small_m={m_path}")


@pytest.mark.parametrize("m", [3, 70], ids=lambda m: f"M{m}")
def test_mxfp4_gemm_w4a8_matches_reference(m):
    # The W4A8 path sees FP8 activations: against the reference on those same dequantized activations
    # it is as tight as the other kernels (only weight blocks 2^8 below their 128-K group's largest
    # would round, and this data has none).
    x, w, s = operands("mxfp4", m, 192, 384)
    a, a_s = quantize_fp8_per_token_group(x)
    x_fp8 = dequantize_fp8_per_token_group(a, a_s, dtype=torch.float32)
    want = (x_fp8.double() @ dequantize_mxfp4(w, s, dtype=torch.float32).double().T).float()
    got = mxfp4_gemm_w4a8_quantized(a, a_s, w, s, out_dtype=torch.float32)
    assert_close_global(got, want, FP32_OUT_MAX_DIFF, f"w4a8 {m=}")


def poison_inputs(fmt: str, ops: tuple) -> tuple:
    """NaN in one activation row and one weight row (or their scales / bias), +inf in a bf16 activation."""
    ops = [t.clone() for t in ops]
    if fmt == "fp8":
        ops[1][2, 1] = float("nan")  # one activation scale group -> row 2 NaN
        ops[3][1, 0] = float("nan")  # one weight block scale -> columns 128.. NaN
        if not INTERPRET:  # the interpreter's fp8 -> fp32 upcast reads the E4M3 NaN code as a number
            ops[0].view(torch.uint8)[1, 5] = 0x7F  # E4M3 NaN code -> row 1 NaN
            ops[2].view(torch.uint8)[7, 130] = 0xFF  # NaN in the weight -> column 7 NaN
    elif fmt == "int8":
        ops[1][1, 0] = float("nan")  # token scale -> row 1
        ops[4][7] = float("nan")  # bias -> column 7
        ops[3][9, 0] = float("inf")  # channel scale -> column 9 +-inf (NaN where the int sum is 0)
    else:
        ops[0][1, 5] = float("nan")
        ops[0][2, 40] = float("inf")  # row 2: +-inf, or NaN where the weight is 0
    return tuple(ops)


@pytest.mark.parametrize("m", [4, 70], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_nan_inf_pattern(fmt, m):
    got, want = _run(fmt, poison_inputs(fmt, operands(fmt, m, 192, 256)))
    assert torch.isnan(want).any(), "the poisoned inputs should give NaN outputs"
    assert_close_global(got, want, BF16_OUT_MAX_DIFF, f"{fmt} {m=} with NaN/Inf")


def _bad(fmt: str, what: str) -> tuple:
    ops = list(operands(fmt, 4, 128, 256))
    if what == "dtype":
        ops[0] = ops[0].float()
    elif what == "scale_shape":  # one scale group / channel too few
        i = {"fp8": 1, "int8": 3, "nvfp4": 2, "mxfp4": 2}[fmt]
        ops[i] = ops[i][:-1]
    elif what == "k_mismatch":
        ops[0] = ops[0][:, :128]
    return tuple(ops)


@pytest.mark.parametrize("what", ["dtype", "scale_shape", "k_mismatch"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_rejects_bad_inputs(fmt, what):
    with pytest.raises(AssertionError):
        KERNELS[fmt][0](*_bad(fmt, what))


def test_fp8_block_gemm_rejects_k_not_multiple_of_128():
    a, a_s, b, b_s = operands("fp8", 4, 128, 256)
    with pytest.raises(AssertionError, match="multiple of 128"):
        fp8_block_gemm(a[:, :192], a_s[:, :2], b[:, :192], b_s[:, :2])


# ---------------------------------------------------------------- GPU, DeepSeek shapes

GPU_M = (1, 16, 64, 128, 2048, 4096)
# fp8_block_gemm runs every DeepSeek shape; the others a subset that keeps N % 128 != 0 (2112, 576),
# the small K (1536) and the longest K (18432), to bound the GPU time.
GPU_SHAPES = {"fp8": DEEPSEEK_V3_NK, "int8": DEEPSEEK_V3_NK[:3] + DEEPSEEK_V3_NK[-1:]}
GPU_SHAPES["nvfp4"] = GPU_SHAPES["mxfp4"] = GPU_SHAPES["int8"]
_WEIGHTS: dict = {}


def gpu_check(got: torch.Tensor, want: torch.Tensor, max_diff: float, what: str) -> None:
    """assert_close_global, computed on the device (the outputs reach 150M elements)."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: Inf pattern differs"
    d = calc_diff(got, want)
    assert d <= max_diff, f"{what}: calc_diff={d:.3e} > {max_diff:.1e}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", GPU_M, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("fmt,n,k", [(f, n, k) for f in FORMATS for n, k in GPU_SHAPES[f]],
                         ids=lambda v: str(v))
def test_gemm_deepseek_shapes_gpu(fmt, n, k, m):
    if (fmt, n, k) not in _WEIGHTS:
        _WEIGHTS.clear()  # one weight at a time: the largest is 264M elements
        torch.manual_seed(1)
        _WEIGHTS[(fmt, n, k)] = _weight(fmt, n, k, "cuda")
    ops = operands(fmt, m, n, k, device="cuda", weight=_WEIGHTS[(fmt, n, k)])
    torch.empty(64 << 20, device="cuda").fill_(float("nan"))  # freed NaN memory: workspaces start dirty
    got, want = _run(fmt, ops)
    w4a8 = fmt == "mxfp4" and m >= configs.W4A8_MIN_M
    gpu_check(got, want, W4A8_MAX_DIFF if w4a8 else BF16_OUT_MAX_DIFF, f"{fmt} {m=} {n=} {k=}")
    if m <= configs.SMALL_M_MAX:  # split-K sums in a fixed order: repeated calls agree bit for bit
        assert torch.equal(got, KERNELS[fmt][0](*ops)), f"{fmt} {m=} {n=} {k=}: not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("m", (128, 2048), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n,k", GPU_SHAPES["mxfp4"], ids=str)
def test_mxfp4_gemm_w4a8_deepseek_shapes_gpu(n, k, m):
    # The W4A8 kernel against the reference on its own FP8 activations (tight, see the CPU twin), then
    # the whole path with the dsquant.kernels.quant activation quantizer against the bf16 reference.
    torch.manual_seed(2)
    x, w, s = operands("mxfp4", m, n, k, device="cuda")
    a, a_s = quantize_fp8_per_token_group(x)
    x_fp8 = dequantize_fp8_per_token_group(a, a_s, dtype=torch.float32)
    want = (x_fp8.double() @ dequantize_mxfp4(w, s, dtype=torch.float32).double().T).float()
    gpu_check(mxfp4_gemm_w4a8_quantized(a, a_s, w, s, out_dtype=torch.float32), want, FP32_OUT_MAX_DIFF,
               f"w4a8 {m=} {n=} {k=}")
    gpu_check(mxfp4_gemm_w4a8(x, w, s), mxfp4_gemm_ref(x, w, s), W4A8_MAX_DIFF, f"w4a8+quant {m=} {n=} {k=}")


@pytest.mark.gpu
@pytest.mark.parametrize("m", (128, 2048), ids=lambda m: f"M{m}")
def test_mxfp4_gemm_dot_scaled_gpu(m):
    # The sm_100 tl.dot_scaled path, forced: on Hopper Triton emulates it (upcast to bf16), which
    # checks the operand layout (packed codes transposed, scales [N, K/32]) even without FP4 hardware.
    x, w, s = operands("mxfp4", m, 2112, 7168, device="cuda")
    got = launch_gemm(x, w, torch.float32, format_codes.MXFP4, w_scale=s, small_m=False, native_fp4=True)
    gpu_check(got, mxfp4_gemm_ref(x, w, s, out_dtype=torch.float32), FP32_OUT_MAX_DIFF, f"dot_scaled {m=}")
