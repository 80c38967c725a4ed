"""CUTLASS anchors for the GEMM benchmarks: FBGEMM GenAI's sm_90a kernels, when `fbgemm-gpu-genai` is installed.

cuBLAS is one baseline; a hand-tuned CUTLASS kernel for the same DeepSeek block-FP8 problem is the other figure a
kernel is judged against. FBGEMM's `f8f8bf16_blockwise` takes x_scale [ceil(M/128), ceil(K/128)] and
w_scale [ceil(N/128), ceil(K/128)], both multipliers, and accepts only 128x128x128 blocks ("Only 128x128x128
block size is supported" for block_m = 1). DeepSeek's activations carry 1x128 scales, so the anchor runs with
one scale per 128x128 activation block: the same MMA work with fewer scale loads, a slightly easier problem.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("anchors")


def fbgemm_missing(op: str = "f8f8bf16_blockwise") -> str | None:
    """Why FBGEMM GenAI's `op` cannot run here, or None."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception as exc:  # ImportError, or a wheel built for another torch / CUDA
        return f"fbgemm_gpu.experimental.gen_ai not importable ({type(exc).__name__}: {str(exc)[:200]})"
    if not hasattr(torch.ops.fbgemm, op):
        return f"this fbgemm-gpu-genai has no {op}"
    return None


def op_schemas(substrings=("blockwise", "i4", "mx4", "fp4")) -> list[str]:
    """Schemas of the torch.ops.fbgemm ops whose names contain any of `substrings` (for the run's log)."""
    out = []
    for name in sorted(dir(torch.ops.fbgemm)):
        if any(s in name for s in substrings):
            try:
                out.append(str(getattr(torch.ops.fbgemm, name).default._schema))
            except Exception:  # overload packets without a default
                out.append(name)
    return out


def fbgemm_fp8_blockwise(a, a_s, b, b_s, ref):
    """(kernel name, zero-argument callable) for FBGEMM's block-FP8 GEMM on the benchmark's operands, checked
    against `ref` (the dsquant reference given the activation scales the anchor applies: each 128-row block
    takes its first row's); None when it fails or disagrees."""
    from dsquant.kernels.testing import calc_diff

    m, kb = a_s.shape
    # A fresh row-major buffer: .contiguous() keeps the odd stride of a one-row view, which FBGEMM rejects.
    xs = torch.empty(((m + 127) // 128, kb), dtype=torch.float32, device=a_s.device)
    xs.copy_(a_s[::128])

    def call():
        return torch.ops.fbgemm.f8f8bf16_blockwise(a, b, xs, b_s, 128, 128, 128)

    try:
        diff = calc_diff(call(), ref(a, xs.repeat_interleave(128, 0)[:m], b, b_s))
    except Exception as exc:
        log.warning("fbgemm f8f8bf16_blockwise: %s", str(exc).splitlines()[0][:200])
        return None
    if diff >= 1e-4:
        log.warning("fbgemm f8f8bf16_blockwise disagrees with the reference: calc_diff %.2e", diff)
        return None
    return "fbgemm_f8f8bf16_blockwise", call


def fbgemm_w4a16_int4(x, w):
    """(kernel name, make_call, weight bytes) for FBGEMM's CUTLASS W4A16 GEMM (bf16i4bf16_shuffled) on weight
    w [N, K] bf16, quantized once to int4 with bf16 scales and zero points per 128 K and preshuffled;
    make_call(x_m) is a zero-argument callable for activations x_m [M, K]. Checked against x @ w^T (int4
    rounding alone gives calc_diff near 5e-3); None when it fails or is far off."""
    from dsquant.kernels.testing import calc_diff

    try:
        from fbgemm_gpu.experimental.gen_ai.quantize import quantize_int4_preshuffle

        wq, (scale, zero) = quantize_int4_preshuffle(w, dtype="bf16")
        diff = calc_diff(torch.ops.fbgemm.bf16i4bf16_shuffled(x, wq, scale, zero), x @ w.t())
    except Exception as exc:
        log.warning("fbgemm bf16i4bf16_shuffled: %s", str(exc).splitlines()[0][:200])
        return None
    if diff >= 2e-2:
        log.warning("fbgemm bf16i4bf16_shuffled disagrees with x @ w^T: calc_diff %.2e", diff)
        return None
    log.info("fbgemm bf16i4bf16_shuffled: calc_diff vs x @ w^T %.2e", diff)
    n_bytes = wq.numel() * wq.element_size() + (scale.numel() + zero.numel()) * 2

    def make_call(x_m):
        return lambda: torch.ops.fbgemm.bf16i4bf16_shuffled(x_m, wq, scale, zero)

    return "fbgemm_bf16i4bf16_shuffled", make_call, n_bytes
