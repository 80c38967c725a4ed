"""Scaled-mm GEMM benchmark on DeepSeek shapes: dsquant kernels against cuBLAS and the copy ceiling.

Baselines, measured in the same run on the same GPU:
- torch._scaled_mm with 1x128 x 128x128 block scales (cuBLAS block scaling), for fp8_block_gemm;
- torch._int_mm followed by the scale/bias epilogue in torch, for int8_scaled_mm (M > 16 only);
- bf16 torch.matmul, for the FP4 GEMMs; and fp8_block_gemm itself at M >= 2048;
- for fp8_block_gemm_gluon (the warp-specialized Hopper kernel, M > 64 on sm_90): the same cuBLAS
  baseline and fp8_block_gemm;
- with --anchor (FBGEMM GenAI installed): its CUTLASS sm_90a f8f8bf16_blockwise, for the FP8 kernels;
- device-to-device copy bandwidth (bytes read + written), the ceiling for weight streaming.
Each CSV row: gpu, torch, triton, date, kernel, M, N, K, us, TFLOPS, GB/s (weight bytes incl. scales
per second), baseline, ratio (baseline time / kernel time; for baseline "copy_bw", GB/s / copy GB/s).

    python3 benchmarks/bench_gemm.py --out benchmarks/results/gemm_h100.csv [--sweep] [--png FILE]
    python3 benchmarks/bench_gemm.py --plot gemm_h100.csv,gemm_w4a16_h100.csv --png FILE  (redraw, no GPU)
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
import triton
from anchors import fbgemm_fp8_blockwise, fbgemm_missing, op_schemas  # benchmarks/ is the script's folder
from dsquant.kernels import format_codes
from dsquant.kernels.gemm import (
    configs,
    fp8_block_gemm,
    fp8_block_gemm_gluon,
    fp8_block_gemm_ref,
    int8_scaled_mm,
    mxfp4_gemm,
    nvfp4_gemm,
)
from dsquant.kernels.gemm.gluon_fp8 import gluon_missing
from dsquant.kernels.gemm.triton import launch_gemm
from dsquant.kernels.gemm.triton_fp4 import mxfp4_gemm_w4a8
from dsquant.kernels.testing import DEEPSEEK_V3_NK, calc_diff
from timing import copy_bandwidth, gpu_header  # benchmarks/ is the script's folder
from triton.testing import do_bench

log = logging.getLogger("bench_gemm")
FIELDS = ["gpu", "torch", "triton", "date", "kernel", "M", "N", "K", "us", "TFLOPS", "GB/s", "baseline", "ratio"]


def _ms(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def _ms_graph(fn, reps: int = 20) -> float:
    """Kernel-only ms per call: a CUDA graph of reps x (256 MB L2 flush + fn) minus one of reps x flush,
    so neither host launch overhead nor an L2-resident weight counts."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def body():
        flush.zero_()
        fn()

    def replay_ms(step) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile / autotune / warm the allocator outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[2]

    return max(replay_ms(body) - replay_ms(flush.zero_), 0.0) / reps


# Scale layouts cuBLAS block scaling may accept: activation scales outer-dim-major (a transposed
# contiguous (K/128, M) buffer viewed as (M, K/128)), weight scales (K/128, N/128). Which strides the
# weight scales need is checked at start-up on a small case against the reference.
_SCALE_B_LAYOUTS = {"b_s.t()": lambda b_s: b_s.t(), "b_s.t().contiguous()": lambda b_s: b_s.t().contiguous()}


def block_scaled_mm_args(a_s, b_s, layout):
    return a_s.t().contiguous().t(), _SCALE_B_LAYOUTS[layout](b_s)


def block_scaled_mm(a, b, scale_a, scale_b):
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def check_scaled_mm_convention() -> str | None:
    """The weight-scale layout under which block-scaled _scaled_mm matches the reference, or None."""
    torch.manual_seed(0)
    m, n, k = 256, 384, 512
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    a_s = torch.rand(m, k // 128, device="cuda") + 0.5
    b_s = torch.rand(n // 128, k // 128, device="cuda") + 0.5
    want = fp8_block_gemm_ref(a, a_s, b, b_s)
    for layout in _SCALE_B_LAYOUTS:
        try:
            d = calc_diff(block_scaled_mm(a, b, *block_scaled_mm_args(a_s, b_s, layout)), want)
        except RuntimeError as e:
            log.warning("torch._scaled_mm block scaling with %s: %s", layout, str(e).splitlines()[0])
            continue
        log.info("torch._scaled_mm block scales, weight scales as %s: calc_diff=%.2e", layout, d)
        if d < 1e-4:
            return layout
    return None


def make_case(fmt: str, m: int, n: int, k: int) -> dict:
    """Random operands in each format's stored layout (codes need not come from a quantizer to be timed)."""
    dev = "cuda"
    x = torch.randn(m, k, device=dev)
    if fmt == "fp8":
        ops = (x.to(torch.float8_e4m3fn), torch.rand(m, k // 128, device=dev) + 0.5,
               torch.randn(n, k, device=dev).to(torch.float8_e4m3fn),
               torch.rand(triton.cdiv(n, 128), k // 128, device=dev) + 0.5)
        return dict(ops=ops, w_bytes=n * k + ops[3].numel() * 4)
    if fmt == "int8":
        ops = (torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev), torch.rand(m, 1, device=dev),
               torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev), torch.rand(n, 1, device=dev),
               torch.randn(n, device=dev))
        return dict(ops=ops, w_bytes=n * k + n * 4)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    if fmt == "nvfp4":
        scale = (torch.rand(n, k // 16, device=dev) * 8 + 1).to(torch.float8_e4m3fn)
        ops = (x.bfloat16(), packed, scale, torch.tensor(0.01, device=dev))
    else:
        ops = (x.bfloat16(), packed, torch.randint(120, 130, (n, k // 32), dtype=torch.uint8, device=dev))
    return dict(ops=ops, w_bytes=packed.numel() + ops[2].numel())


KERNELS = {"fp8": fp8_block_gemm, "int8": int8_scaled_mm, "nvfp4": nvfp4_gemm, "mxfp4": mxfp4_gemm}


class Rows:
    """Collects CSV rows, written as they come so a run cut short keeps what it measured."""

    def __init__(self, path: str, cuda_graph: bool = False):
        self.cuda_graph = cuda_graph
        self.head = gpu_header()
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, FIELDS)
        self.writer.writeheader()
        self.rows: list[dict] = []

    def ms(self, fn) -> float:
        """Median ms per call: do_bench (L2 flushed), or CUDA-graph replay when asked (falls back to do_bench)."""
        if self.cuda_graph:
            try:
                return _ms_graph(fn)
            except RuntimeError as e:
                log.warning("CUDA-graph timing failed (%s): do_bench instead", str(e).splitlines()[0])
        return _ms(fn)

    def add(self, kernel, m, n, k, ms, w_bytes, baseline="", ratio=None):
        row = dict(self.head, kernel=kernel, M=m, N=n, K=k, us=round(ms * 1e3, 2),
                   TFLOPS=round(2 * m * n * k / ms / 1e9, 1), **{"GB/s": round(w_bytes / ms / 1e6, 1)},
                   baseline=baseline, ratio="" if ratio is None else round(ratio, 3))
        self.writer.writerow(row)
        self.file.flush()
        self.rows.append(row)
        log.info("%-24s M=%-5d N=%-6d K=%-6d %9.1f us %7.1f TFLOPS %7.1f GB/s %s %s", kernel, m, n, k, ms * 1e3,
                 row["TFLOPS"], row["GB/s"], baseline, row["ratio"])


def gluon_runs() -> bool:
    """fp8_block_gemm_gluon can run here (Hopper, a Triton with its Gluon API); says why not once."""
    if not hasattr(gluon_runs, "ok"):
        why = gluon_missing() or (None if torch.cuda.get_device_capability()[0] == 9 else "not an sm_90 GPU")
        if why:
            log.warning("fp8_block_gemm_gluon not timed: %s", why)
        gluon_runs.ok = why is None
    return gluon_runs.ok


def bench_shape(rows: Rows, fmt: str, m: int, n: int, k: int, copy_gbs: float, block_mm_layout: str | None,
                fp8_ms: dict, anchor: bool = False):
    case = make_case(fmt, m, n, k)
    ops, wb = case["ops"], case["w_bytes"]
    ms = rows.ms(lambda: KERNELS[fmt](*ops))
    name = {"fp8": "fp8_block_gemm", "int8": "int8_scaled_mm", "nvfp4": "nvfp4_gemm", "mxfp4": "mxfp4_gemm"}[fmt]
    rows.add(name, m, n, k, ms, wb, "copy_bw", wb / ms / 1e6 / copy_gbs)
    if fmt == "fp8":
        fp8_ms[(m, n, k)] = ms
        if block_mm_layout:
            scales = block_scaled_mm_args(ops[1], ops[3], block_mm_layout)
            base = rows.ms(lambda: block_scaled_mm(ops[0], ops[2], *scales))
            rows.add("torch_scaled_mm_block", m, n, k, base, wb)
            rows.add(name, m, n, k, ms, wb, "torch_scaled_mm_block", base / ms)
        timed = {name: ms}
        if m > configs.SMALL_M_MAX and gluon_runs():
            t = timed["fp8_block_gemm_gluon"] = rows.ms(lambda: fp8_block_gemm_gluon(*ops))
            rows.add("fp8_block_gemm_gluon", m, n, k, t, wb, "fp8_block_gemm", ms / t)
            if block_mm_layout:
                rows.add("fp8_block_gemm_gluon", m, n, k, t, wb, "torch_scaled_mm_block", base / t)
        found = fbgemm_fp8_blockwise(*ops, fp8_block_gemm_ref) if anchor else None
        if found:
            anchor_name, anchor_fn = found
            t_anchor = rows.ms(anchor_fn)
            rows.add(anchor_name, m, n, k, t_anchor, wb, "copy_bw", wb / t_anchor / 1e6 / copy_gbs)
            if block_mm_layout:
                rows.add(anchor_name, m, n, k, t_anchor, wb, "torch_scaled_mm_block", base / t_anchor)
            for kernel, t in timed.items():
                rows.add(kernel, m, n, k, t, wb, anchor_name, t_anchor / t)
    elif fmt == "int8" and m > 16:  # cuBLAS int8 needs M > 16
        a, a_s, b, b_s, bias = ops
        bt = b.t()
        base = rows.ms(lambda: (torch._int_mm(a, bt).float() * a_s * b_s.t() + bias).bfloat16())
        rows.add("torch_int_mm+epilogue", m, n, k, base, wb)
        rows.add(name, m, n, k, ms, wb, "torch_int_mm+epilogue", base / ms)
    elif fmt in ("nvfp4", "mxfp4"):
        xb, wt = ops[0], torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        base = rows.ms(lambda: xb @ wt.t())
        rows.add("torch_bf16_matmul", m, n, k, base, 2 * n * k)
        rows.add(name, m, n, k, ms, wb, "torch_bf16_matmul", base / ms)
        if (m, n, k) in fp8_ms:
            rows.add(name, m, n, k, ms, wb, "fp8_block_gemm", fp8_ms[(m, n, k)] / ms)
        if fmt == "mxfp4" and m >= 128:  # both large-M paths, to place configs.W4A8_MIN_M
            paths = {"mxfp4_w4a8": lambda: mxfp4_gemm_w4a8(*ops),
                     "mxfp4_w4a16": lambda: launch_gemm(ops[0], ops[1], torch.bfloat16, format_codes.MXFP4,
                                                        w_scale=ops[2], small_m=False)}
            for path, fn in paths.items():
                t = rows.ms(fn)
                rows.add(path, m, n, k, t, wb, "torch_bf16_matmul", base / t)
                if (m, n, k) in fp8_ms:
                    rows.add(path, m, n, k, t, wb, "fp8_block_gemm", fp8_ms[(m, n, k)] / t)


def sweep_small_m(rows: Rows, copy_gbs: float, num_sms: int):
    """Swap-AB split-K tiles around the heuristic, at decode M; rows named kernel[variant]."""
    for fmt in ("fp8", "nvfp4"):
        fmt_id = format_codes.FP8_BLOCK if fmt == "fp8" else format_codes.NVFP4
        for n, k in ((2112, 7168), (7168, 2048), (4096, 7168)):
            m = 16
            case = make_case(fmt, m, n, k)
            ops = case["ops"]
            if fmt == "fp8":
                a, w, kw = ops[0], ops[2], dict(a_scale=ops[1], w_scale=ops[3])
            else:
                a, w, kw = ops[0], ops[1], dict(w_scale=ops[2], global_scale=ops[3].reshape(1))
            base = configs.small_m_config(m, n, k, fmt_id, num_sms)
            k_tiles = triton.cdiv(k, base["BLOCK_K"])
            other = dict(BLOCK_N=64) if fmt == "fp8" else dict(BLOCK_N=128)
            variants = [("heur", {}), ("split/2", dict(SPLIT_K=max(1, base["SPLIT_K"] // 2))),
                        ("split*2", dict(SPLIT_K=min(k_tiles, base["SPLIT_K"] * 2))),
                        ("stages3", dict(num_stages=3)), (f"bn{other['BLOCK_N']}", other)]
            if fmt == "nvfp4":  # FP4: wider K steps (bytes per weight row per request), fewer or more warps
                # about as many K steps per split as the heuristic's
                split256 = configs.split_k(triton.cdiv(k, 256), base["SPLIT_K"] * base["BLOCK_K"] // 256)
                variants += [("bk256", dict(BLOCK_K=256, SPLIT_K=split256)),
                             ("bk256w8", dict(BLOCK_K=256, SPLIT_K=split256, num_warps=8)),
                             ("w2", dict(num_warps=2)), ("w8", dict(num_warps=8)), ("bn32", dict(BLOCK_N=32)),
                             ("bn32w2", dict(BLOCK_N=32, num_warps=2))]
            for name, change in variants:
                cfg = dict(base, **change)
                ms = rows.ms(lambda: launch_gemm(a, w, torch.bfloat16, fmt_id, small_m=True, small_cfg=cfg, **kw))
                rows.add(f"{fmt}_small[{name} s{cfg['SPLIT_K']}]", m, n, k, ms, case["w_bytes"], "copy_bw",
                         case["w_bytes"] / ms / 1e6 / copy_gbs)


def roofline_png(rows: list[dict], copy_gbs: float, path: str) -> None:
    """TFLOPS against FLOP per weight byte, one point per (kernel, M, N, K), under the copy-bandwidth line. Rows of
    several runs (`--plot`) keep apart by their run's date in the legend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no roofline plot")
        return
    runs = sorted({r["date"] for r in rows})
    points: dict = {}
    for r in rows:
        if "[" not in r["kernel"]:
            label = r["kernel"] if len(runs) == 1 else f"{r['kernel']} ({r['date']})"
            points.setdefault(label, {})[(r["M"], r["N"], r["K"])] = r
    fig, ax = plt.subplots(figsize=(9, 7))
    for label, pts in sorted(points.items()):
        pts = list(pts.values())
        ai = [2 * r["M"] * r["N"] * r["K"] / (r["GB/s"] * r["us"] * 1e3) for r in pts]  # FLOP per weight byte
        ax.scatter(ai, [r["TFLOPS"] for r in pts], label=label, s=12, marker="o" if "(" not in label or
                   label.endswith(f"({runs[-1]})") else "x")
    xs = [10 ** (i / 10) for i in range(0, 50)]
    ax.plot(xs, [copy_gbs * x / 1e3 for x in xs], "k--", label=f"copy {copy_gbs:.0f} GB/s x FLOP/B")
    ax.set(xscale="log", yscale="log", xlabel="FLOP per weight byte", ylabel="TFLOPS", title=rows[0]["gpu"])
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=120)


def rows_from_csv(paths: list[str]) -> tuple[list[dict], float]:
    """Rows of result CSVs written by this script or bench_w4a16.py, numbers parsed, and the device copy
    bandwidth of the last run (from its copy_bw ratios)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                r.update({c: int(r[c]) for c in ("M", "N", "K")}, **{c: float(r[c]) for c in ("us", "TFLOPS", "GB/s")})
                r["ratio"] = float(r["ratio"]) if r["ratio"] else None
                rows.append(r)
    last = [r for r in rows if r["date"] == max(q["date"] for q in rows) and r["baseline"] == "copy_bw"]
    return rows, last[0]["GB/s"] / last[0]["ratio"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gemm_h100.csv")
    p.add_argument("--m", default="1,16,64,128,2048,4096", help="comma-separated M values")
    p.add_argument("--formats", default="fp8,int8,nvfp4,mxfp4")
    p.add_argument("--sweep", action="store_true", help="also sweep swap-AB split-K tiles at M=16")
    p.add_argument("--png", default=None, help="roofline plot path")
    p.add_argument("--plot", default=None, help="comma-separated result CSVs: redraw the roofline (--png), run nothing")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    p.add_argument("--anchor", action="store_true", help="also time FBGEMM GenAI's CUTLASS block-FP8 GEMM")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays (kernel-only, L2 flushed) instead of do_bench's launched calls")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.plot:
        roofline_png(*rows_from_csv(args.plot.split(",")), args.png)
        return
    start = time.time()
    rows = Rows(args.out, cuda_graph=args.cuda_graph)
    log.info("%s | torch %s | triton %s | %s", rows.head["gpu"], rows.head["torch"], rows.head["triton"],
             rows.head["date"])
    copy_gbs = copy_bandwidth()
    log.info("device copy bandwidth: %.0f GB/s", copy_gbs)
    block_mm_layout = check_scaled_mm_convention()
    if args.sweep:
        sweep_small_m(rows, copy_gbs, torch.cuda.get_device_properties(0).multi_processor_count)
    fp8_ms: dict = {}
    anchor = args.anchor and not fbgemm_missing()
    if args.anchor and not anchor:
        log.warning("--anchor: %s", fbgemm_missing())
    if anchor:
        log.info("fbgemm ops:\n  %s", "\n  ".join(op_schemas()))
    ms_list = [int(v) for v in args.m.split(",")]
    for fmt in args.formats.split(","):
        for n, k in DEEPSEEK_V3_NK:
            for m in ms_list:
                if time.time() - start > args.budget_s:
                    log.warning("time budget reached: stopping before %s M=%d N=%d K=%d", fmt, m, n, k)
                    break
                try:
                    bench_shape(rows, fmt, m, n, k, copy_gbs, block_mm_layout, fp8_ms, anchor)
                except Exception as e:  # one failing shape should not lose the others' figures
                    log.error("%s M=%d N=%d K=%d failed: %s", fmt, m, n, k, e)
                torch.cuda.empty_cache()
    _summary(rows.rows, copy_gbs)
    if args.png:
        roofline_png(rows.rows, copy_gbs, args.png)


def _summary(rows: list[dict], copy_gbs: float) -> None:
    """Geometric-mean ratios per (kernel, baseline, M regime), the figures the targets are stated in."""
    groups: dict = {}
    for r in rows:
        if r["baseline"] and "[" not in r["kernel"]:
            regime = "M<=16" if r["M"] <= 16 else "M<=64" if r["M"] <= 64 else "M<2048" if r["M"] < 2048 else "M>=2048"
            groups.setdefault((r["kernel"], r["baseline"], regime), []).append(r["ratio"])
    for (kernel, base, regime), vals in sorted(groups.items()):
        geo = math.exp(sum(math.log(max(v, 1e-9)) for v in vals) / len(vals))
        log.info("SUMMARY %-16s vs %-22s %-8s geomean %.3f (n=%d, min %.3f)", kernel, base, regime, geo, len(vals),
                 min(vals))


if __name__ == "__main__":
    main()
