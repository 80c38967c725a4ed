"""CUTLASS anchors for the GEMM benchmark: FBGEMM GenAI's sm_90a kernels, when `fbgemm-gpu-genai` is installed.

cuBLAS is one baseline; a hand-tuned CUTLASS kernel for the same DeepSeek block-FP8 problem is the other figure a
kernel is judged against. FBGEMM's `f8f8bf16_blockwise` takes x_scale [ceil(M/block_m), ceil(K/128)] and
w_scale [ceil(N/128), ceil(K/128)], both multipliers. DeepSeek's activations carry 1x128 scales (block_m = 1);
where the build only accepts block_m = 128, the anchor runs with 128x128 activation blocks, the same MMA work
with fewer scale loads, and its kernel name says which.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("anchors")


def fbgemm_missing() -> str | None:
    """Why the FBGEMM GenAI ops cannot run here, or None."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception as exc:  # ImportError, or a wheel built for another torch / CUDA
        return f"fbgemm_gpu.experimental.gen_ai not importable ({type(exc).__name__}: {str(exc)[:200]})"
    if not hasattr(torch.ops.fbgemm, "f8f8bf16_blockwise"):
        return "this fbgemm-gpu-genai has no f8f8bf16_blockwise"
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
    against `ref` (the dsquant reference with the activation scales the anchor actually applies); None when
    neither activation block height runs correctly."""
    from dsquant.kernels.testing import calc_diff

    m = a.shape[0]
    for block_m in (1, 128):
        if block_m == 1:
            xs = a_s.contiguous()
        else:  # one scale per 128x128 activation block: the first row's, so the reference sees the same values
            xs = a_s[::128].contiguous()
        try:
            def call(xs=xs, block_m=block_m):
                return torch.ops.fbgemm.f8f8bf16_blockwise(a, b, xs, b_s, block_m, 128, 128)

            got = call()
            rows = xs.repeat_interleave(block_m, 0)[:m]
            diff = calc_diff(got, ref(a, rows, b, b_s))
        except Exception as exc:
            log.warning("fbgemm f8f8bf16_blockwise block_m=%d: %s", block_m, str(exc).splitlines()[0][:200])
            continue
        if diff < 1e-4:
            return f"fbgemm_f8f8bf16_blockwise[bm{block_m}]", call
        log.warning("fbgemm f8f8bf16_blockwise block_m=%d disagrees with the reference: calc_diff %.2e", block_m,
                    diff)
    return None
