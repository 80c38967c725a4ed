"""Small-M W4A16 benchmark: w4a16_gemm (weights in the MMA layout) against bf16 cuBLAS, on DeepSeek shapes.

Measured in the same run on the same GPU, M in {1, 4, 8, 16} by default, CUDA-graph replays with L2 flushed:
- bf16 torch.matmul (cuBLAS), the baseline every ratio is stated against;
- nvfp4_gemm / mxfp4_gemm on the stored layout (the swap-AB split-K kernel of triton.py);
- w4a16_gemm_nvfp4 / w4a16_gemm_mxfp4 (triton_w4a16.py), after to_mma_layout (done once, untimed);
- with --anchor (FBGEMM GenAI installed): its CUTLASS W4A16 kernel. FBGEMM has no FP4 W4A16 kernel for Hopper
  (its f4f4bf16 is Blackwell-only), so the anchor is bf16i4bf16_shuffled: int4 weights with bf16 scales and
  zero points per 128 K, preshuffled offline, about the same bytes per weight as NVFP4 / MXFP4.
Each CSV row is bench_gemm.py's (gpu, torch, triton, date, kernel, M, N, K, us, TFLOPS, GB/s, baseline, ratio:
baseline time / kernel time). The SUMMARY lines give geometric means over all DeepSeek shapes and over the
MLP ones (expert and dense gate+up / down).

    python3 benchmarks/bench_w4a16.py --out benchmarks/results/gemm_w4a16_h100.csv [--sweep] [--anchor]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
from anchors import fbgemm_missing, fbgemm_w4a16_int4  # benchmarks/ is the script's folder
from bench_gemm import Rows, make_case
from dsquant.kernels.gemm import (
    configs,
    mxfp4_gemm,
    mxfp4_gemm_ref,
    nvfp4_gemm,
    nvfp4_gemm_ref,
    to_mma_layout,
    w4a16_gemm,
)
from dsquant.kernels.gemm.triton_w4a16 import w4a16_config
from dsquant.kernels.testing import DEEPSEEK_V3_NK, calc_diff
from timing import copy_bandwidth

log = logging.getLogger("bench_w4a16")
STORED = {"nvfp4": (nvfp4_gemm, nvfp4_gemm_ref), "mxfp4": (mxfp4_gemm, mxfp4_gemm_ref)}
MLP_NK = ((4096, 7168), (7168, 2048), (36864, 7168), (7168, 18432))


def sweep_variants(m: int, layout, num_sms: int) -> dict:
    """Launch parameters around the heuristic's: pipeline depth, K step and split, tile shape, split sum."""
    heur = w4a16_config(m, layout, num_sms)
    k_tiles = layout.k_pad // heur["BLOCK_K"]
    return {
        "heur": heur,
        "stages-1": dict(heur, num_stages=heur["num_stages"] - 1),
        "stages+1": dict(heur, num_stages=heur["num_stages"] + 1),
        "split/2": dict(heur, SPLIT_K=configs.split_k(k_tiles, heur["SPLIT_K"] // 2)),
        "split*2": dict(heur, SPLIT_K=configs.split_k(k_tiles, heur["SPLIT_K"] * 2)),
        "bk128s4": w4a16_config(m, layout, num_sms, block_k=128, num_stages=4),
        "bk256s3": w4a16_config(m, layout, num_sms, block_k=256, num_stages=3),
        "anysplit": w4a16_config(m, layout, num_sms, min_split_k=0),
        "bn128w8": w4a16_config(m, layout, num_sms, block_n=128),
        "slots2": w4a16_config(m, layout, num_sms, ctas_per_sm=2),
        "sum2launch": dict(heur, FUSED_SUM=False),
    }


def sweep(rows: Rows, fmt: str, x: torch.Tensor, layout, wb: int, copy_gbs: float, num_sms: int) -> tuple:
    """Every variant at M = x's rows (rows named kernel[variant sSPLIT]); the fastest as (name, cfg)."""
    m, n, k = x.shape[0], layout.n, layout.k
    best = (float("inf"), "heur", None)
    timed = []
    for variant, cfg in sweep_variants(m, layout, num_sms).items():
        if cfg in timed:  # a variant that lands on the heuristic's (or an earlier variant's) launch
            continue
        timed.append(cfg)
        try:
            t = rows.ms(lambda: w4a16_gemm(x, layout, cfg=cfg))
        except Exception as e:  # a tile the compiler rejects should not end the sweep
            log.error("%s %s: %s", variant, cfg, str(e).splitlines()[0][:200])
            continue
        rows.add(f"w4a16_gemm_{fmt}[{variant} s{cfg['SPLIT_K']}]", m, n, k, t, wb, "copy_bw", wb / t / 1e6 / copy_gbs)
        best = min(best, (t, variant, cfg), key=lambda b: b[0])
    return best[1], best[2]


def bench_shape(
    rows: Rows,
    fmt: str,
    n: int,
    k: int,
    ms_list: list[int],
    copy_gbs: float,
    anchor: bool,
    do_sweep: bool,
    num_sms: int,
) -> None:
    case = make_case(fmt, max(ms_list), n, k)
    ops, wb = case["ops"], case["w_bytes"]
    stored, ref = STORED[fmt]
    layout = to_mma_layout(*ops[1:])
    diff = calc_diff(w4a16_gemm(ops[0], layout), ref(*ops))
    (log.info if diff < 1e-5 else log.error)(
        "w4a16_gemm_%s N=%d K=%d calc_diff vs %s %.2e", fmt, n, k, ref.__name__, diff
    )
    name = f"w4a16_gemm_{fmt}"
    kernels = {name: None}
    if do_sweep:  # the fastest variant at the largest M is timed at every M too, as name[best:variant]
        variant, cfg = sweep(rows, fmt, ops[0], layout, wb, copy_gbs, num_sms)
        if variant != "heur":
            kernels[f"{name}[best:{variant}]"] = cfg
    wt = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    found = fbgemm_w4a16_int4(ops[0], wt) if anchor else None
    for m in ms_list:
        x = ops[0][:m]
        base = rows.ms(lambda: x @ wt.t())
        rows.add("torch_bf16_matmul", m, n, k, base, 2 * n * k)
        t_old = rows.ms(lambda: stored(x, *ops[1:]))
        rows.add(stored.__name__, m, n, k, t_old, wb, "torch_bf16_matmul", base / t_old)
        timed = {}
        for kernel, cfg in kernels.items():
            # a sweep's cfg is for the largest M; the heuristic's BLOCK_M for this M keeps its tile and split
            cfg = None if cfg is None else dict(cfg, BLOCK_M=w4a16_config(m, layout, num_sms)["BLOCK_M"])
            t = timed[kernel] = rows.ms(lambda: w4a16_gemm(x, layout, cfg=cfg))
            rows.add(kernel, m, n, k, t, wb, "torch_bf16_matmul", base / t)
            rows.add(kernel, m, n, k, t, wb, stored.__name__, t_old / t)
            rows.add(kernel, m, n, k, t, wb, "copy_bw", wb / t / 1e6 / copy_gbs)
        if found:
            anchor_name, make_call, anchor_bytes = found
            t_anchor = rows.ms(make_call(x))
            rows.add(anchor_name, m, n, k, t_anchor, anchor_bytes, "torch_bf16_matmul", base / t_anchor)
            for kernel, t in timed.items():
                rows.add(kernel, m, n, k, t, wb, anchor_name, t_anchor / t)


def summary(rows: list[dict]) -> None:
    """Geometric-mean ratios per (kernel, baseline) at M <= 16, over all shapes and over the MLP shapes.
    `w4a16_gemm_<fmt>[tuned]` takes, per shape and M, the faster of the heuristic and the sweep's best."""
    per_case: dict = {}
    for r in rows:
        if not r["baseline"] or r["M"] > 16 or ("[" in r["kernel"] and "[best:" not in r["kernel"]):
            continue
        kernel = r["kernel"].split("[")[0]
        case = (r["baseline"], r["M"], r["N"], r["K"])
        per_case.setdefault((r["kernel"], *case), r["ratio"])
        if kernel.startswith("w4a16_gemm_"):
            tuned = (f"{kernel}[tuned]", *case)
            per_case[tuned] = max(per_case.get(tuned, 0.0), r["ratio"])
    groups: dict = {}
    for (kernel, base, m, n, k), ratio in per_case.items():
        if "[best:" in kernel:
            continue
        groups.setdefault((kernel, base, "all"), []).append(ratio)
        if (n, k) in MLP_NK:
            groups.setdefault((kernel, base, "mlp"), []).append(ratio)
    for (kernel, base, shapes), vals in sorted(groups.items()):
        geo = math.exp(sum(math.log(max(v, 1e-9)) for v in vals) / len(vals))
        log.info(
            "SUMMARY %-28s vs %-26s M<=16 %-3s geomean %.3f (n=%d, min %.3f)",
            kernel,
            base,
            shapes,
            geo,
            len(vals),
            min(vals),
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gemm_w4a16_h100.csv")
    p.add_argument("--m", default="1,4,8,16", help="comma-separated M values (<= 64)")
    p.add_argument("--formats", default="nvfp4,mxfp4")
    p.add_argument(
        "--sweep",
        default="",
        help="formats whose launch parameters to sweep at the largest M; the fastest is then timed at every M",
    )
    p.add_argument("--anchor", action="store_true", help="also time FBGEMM GenAI's CUTLASS W4A16 (int4) GEMM")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    rows = Rows(args.out, cuda_graph=True)
    log.info(
        "%s | torch %s | triton %s | %s", rows.head["gpu"], rows.head["torch"], rows.head["triton"], rows.head["date"]
    )
    copy_gbs = copy_bandwidth()
    log.info("device copy bandwidth: %.0f GB/s", copy_gbs)
    anchor = args.anchor and not fbgemm_missing("bf16i4bf16_shuffled")
    if args.anchor and not anchor:
        log.warning("--anchor: %s", fbgemm_missing("bf16i4bf16_shuffled"))
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    ms_list = [int(v) for v in args.m.split(",")]
    # the MLP shapes first (the target is stated on them), both formats per shape, so a budget cut keeps pairs
    shapes = list(MLP_NK) + [nk for nk in DEEPSEEK_V3_NK if nk not in MLP_NK]
    for (n, k), fmt in itertools.product(shapes, args.formats.split(",")):
        if time.time() - start > args.budget_s:
            log.warning("time budget reached: stopping before %s N=%d K=%d", fmt, n, k)
            break
        try:
            bench_shape(rows, fmt, n, k, ms_list, copy_gbs, anchor and fmt == "nvfp4", fmt in args.sweep, num_sms)
        except Exception as e:  # one failing shape should not lose the others' figures
            log.error("%s N=%d K=%d failed: %s", fmt, n, k, e)
        torch.cuda.empty_cache()
    summary(rows.rows)


if __name__ == "__main__":
    main()
