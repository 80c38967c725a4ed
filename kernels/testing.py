"""Comparison helpers and DeepSeek shapes shared by the kernel tests and benchmarks (imports only torch)."""

from __future__ import annotations

import torch

# (N, K) of the DeepSeek-V3 projections (DeepGEMM's test shapes plus the dense MLP).
DEEPSEEK_V3_NK = (
    (2112, 7168),  # fused q_a_proj + kv_a_proj_with_mqa
    (576, 7168),  # kv_a_proj_with_mqa
    (24576, 1536),  # q_b_proj
    (32768, 512),  # kv_b_proj
    (7168, 16384),  # o_proj
    (4096, 7168),  # expert gate+up
    (7168, 2048),  # expert down
    (36864, 7168),  # dense gate+up
    (7168, 18432),  # dense down
)
DEEPSEEK_V3_MOE = dict(hidden=7168, inter=2048, experts=256, topk=8, groups=8, topk_groups=4)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-exact comparison (codes and scales): compares raw bytes, so -0/+0 and NaN payloads count."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    e = expected.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    diff = a != e
    if bool(diff.any()):
        idx = torch.nonzero(diff)[:5].flatten().tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} of {a.numel()} bytes differ; first byte indices {idx}")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2<x,y> / (|x|^2 + |y|^2) in float64 (DeepGEMM's global metric): 0 for equal tensors."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if float(denom) == 0.0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def assert_close_global(actual: torch.Tensor, expected: torch.Tensor, max_diff: float, what: str = "") -> None:
    """Global error metric plus NaN/Inf pattern check, for accumulating kernels (GEMM, MoE, MLA)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: Inf pattern differs"
    finite = torch.isfinite(e)
    d = calc_diff(a[finite], e[finite])
    assert d <= max_diff, f"{what}: calc_diff={d:.3e} > {max_diff:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (floats) or 0x7F bytes so unwritten elements are caught."""
    if t.is_floating_point() and t.element_size() >= 2:
        return t.fill_(float("nan"))
    t.view(torch.uint8).fill_(0x7F)
    return t
