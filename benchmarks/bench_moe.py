"""Fused MoE benchmark at DeepSeek-V3 shapes (H=7168, I=2048, E=256, top-8): routing, decode, prefill.

Measured in one run on one GPU, each figure beside its baseline:
- route+align: deepseek_route + moe_align, CUDA-graph time per layer (target <= 10 us, 1..4096 tokens);
- decode (1-64 tokens): GB/s on the expert weight bytes actually touched (weights + scales of the experts hit) vs
  the device copy bandwidth (bytes read + written; target >= 65%);
- prefill (16384 tokens, balanced: 512 rows per expert): TFLOPS vs a torch loop over experts with cuBLAS (bf16
  matmul; for fp8 torch._scaled_mm with 1x128 x 128x128 block scales); and fp8_block_gemm on one dense GEMM of the
  same FLOPs (the "dense_gemm" row).
Kernel times are CUDA-graph replays (no launch overhead); the torch loop is timed eagerly, as it runs.
CSV columns: gpu, torch, triton, date, bench, fmt, T, us, TFLOPS, GB/s, baseline, baseline_us, ratio, note.

    PYTHONPATH=. python3 benchmarks/bench_moe.py --out benchmarks/results/moe_h100.csv [--sweep] [--budget-s 90]
    PYTHONPATH=. python3 benchmarks/bench_moe.py --ptxas benchmarks/results/moe_sm90_ptxas.csv   (no GPU needed)
(PYTHONPATH=. in a source checkout; the prefill ratio to fp8_block_gemm is the "prefill" fp8 row over "dense_gemm".)
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import time

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
import torch.nn.functional as F
import triton
from dsquant.kernels.moe import deepseek_route, fused_moe, moe_align
from dsquant.kernels.moe.fused import default_tiles
from dsquant.kernels.moe.reference import ExpertWeights
from dsquant.kernels.quant import quantize_fp8_per_token_group
from dsquant.kernels.testing import DEEPSEEK_V3_MOE
from timing import copy_bandwidth, gpu_header  # benchmarks/ is the script's folder
from triton.testing import do_bench, do_bench_cudagraph

log = logging.getLogger("bench_moe")
H, INTER, E, TOPK = (DEEPSEEK_V3_MOE[k] for k in ("hidden", "inter", "experts", "topk"))
FIELDS = ["gpu", "torch", "triton", "date", "bench", "fmt", "T", "us", "TFLOPS", "GB/s", "baseline", "baseline_us",
          "ratio", "note"]
V3_ROUTER = dict(n_group=8, topk_group=4, top_k=TOPK, routed_scaling_factor=2.5, norm_topk_prob=True)


class Rows:
    """CSV rows written as they come, so a run cut short keeps what it measured."""

    def __init__(self, path: str):
        self.head = gpu_header()
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, FIELDS)
        self.writer.writeheader()

    def add(self, bench, fmt, t, ms, flops=0.0, nbytes=0.0, baseline="", base_ms=None, ratio=None, note=""):
        row = dict(self.head, bench=bench, fmt=fmt, T=t, us=round(ms * 1e3, 2), TFLOPS=round(flops / ms / 1e9, 1),
                   **{"GB/s": round(nbytes / ms / 1e6, 1)}, baseline=baseline,
                   baseline_us="" if base_ms is None else round(base_ms * 1e3, 2),
                   ratio="" if ratio is None else round(ratio, 3), note=note)
        self.writer.writerow(row)
        self.file.flush()
        log.info("%-12s %-6s T=%-6d %9.1f us %7.1f TFLOPS %7.1f GB/s  %s %s %s", bench, fmt, t, ms * 1e3,
                 row["TFLOPS"], row["GB/s"], baseline, row["ratio"], note)


def graph_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=30, return_mode="median")


def random_experts(fmt: str) -> ExpertWeights:
    """Valid codes and scales in each stored layout, generated directly (timing needs no quantizer)."""
    dev = "cuda"
    shapes = {"w13": (E, 2 * INTER, H), "w2": (E, H, INTER)}
    parts: dict = {}
    for name, (e, n, k) in shapes.items():
        if fmt == "bf16":
            parts[name] = torch.randn(e, n, k, device=dev, dtype=torch.bfloat16) * k**-0.5
        elif fmt == "fp8":
            parts[name] = torch.randn(e, n, k, device=dev, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
            parts[f"{name}_scale"] = torch.rand(e, n // 128, k // 128, device=dev) * 1e-3 + 1e-4
        elif fmt == "int8":
            parts[name] = torch.randint(-127, 128, (e, n, k), dtype=torch.int8, device=dev)
            parts[f"{name}_scale"] = torch.rand(e, n, 1, device=dev) * 1e-3 + 1e-4
        else:
            parts[name] = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=dev)
            if fmt == "nvfp4":
                parts[f"{name}_scale"] = (torch.rand(e, n, k // 16, device=dev) * 8 + 1).to(torch.float8_e4m3fn)
                parts[f"{name}_global_scale"] = torch.full((e,), 1e-3, device=dev)
            else:
                parts[f"{name}_scale"] = torch.randint(118, 124, (e, n, k // 32), dtype=torch.uint8, device=dev)
    return ExpertWeights(fmt=fmt, **parts)


def expert_bytes(ew: ExpertWeights) -> int:
    """Bytes of one expert: weights + scales (+ global scales)."""
    return sum(t[0].numel() * t.element_size() for t in ew[:2] + ew[3:] if isinstance(t, torch.Tensor))


def kw_of(ew: ExpertWeights) -> dict:
    return dict(fmt=ew.fmt, w13_scale=ew.w13_scale, w2_scale=ew.w2_scale, w13_global_scale=ew.w13_global_scale,
                w2_global_scale=ew.w2_global_scale)


def routed(t: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(t, E, device="cuda", generator=g)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    w, ids = deepseek_route(logits, bias, **V3_ROUTER)
    x = torch.randn(t, H, device="cuda", generator=g).bfloat16()
    return logits, bias, x, w, ids


def bench_routing(rows: Rows, tokens: list[int]):
    for t in tokens:
        logits, bias, *_ = routed(t)
        block_m = default_tiles(t * TOPK, E, "fp8")["BLOCK_M"]

        def step():
            _, ids = deepseek_route(logits, bias, **V3_ROUTER)
            return moe_align(ids, E, block_m)

        ms = graph_ms(step)
        rows.add("route+align", "fp32", t, ms, baseline="target_10us", ratio=0.010 / ms, note=f"block_m={block_m}")
    for t in (1, 4096):  # Kimi-K2: 384 experts, one group
        logits = torch.randn(t, 384, device="cuda")
        bias = torch.zeros(384, device="cuda")
        ms = graph_ms(lambda: moe_align(deepseek_route(logits, bias, top_k=8, routed_scaling_factor=2.827)[1], 384, 16))
        rows.add("route+align", "fp32", t, ms, baseline="target_10us", ratio=0.010 / ms, note="E=384")


# FP4 decode tiles around the heuristic (BLOCK_K, BLOCK_N, warps, stages)
FP4_DECODE_SWEEP = [(64, 64, 8, 4), (128, 64, 4, 6), (128, 128, 4, 4), (128, 64, 2, 4), (128, 32, 2, 4),
                    (256, 64, 4, 3), (128, 128, 8, 4)]


def bench_decode(rows: Rows, ew: ExpertWeights, copy_gbs: float, tokens: list[int], sweep: bool):
    per_expert = expert_bytes(ew)
    for t in tokens:
        _, _, x, w, ids = routed(t, seed=t)
        touched = int(torch.unique(ids).numel()) * per_expert
        variants = [("heuristic", None)]
        if sweep:
            variants += [("stages3", dict(num_stages=3)), ("warps8", dict(num_warps=8))]
        if sweep and ew.fmt in ("nvfp4", "mxfp4"):  # wider K steps read more of each weight row per request
            variants += [(f"k{bk}n{bn}w{nw}s{ns}", dict(BLOCK_K=bk, BLOCK_N=bn, num_warps=nw, num_stages=ns))
                         for bk, bn, nw, ns in FP4_DECODE_SWEEP]
        for name, tiles in variants:
            ms = graph_ms(lambda: fused_moe(x, ew.w13, ew.w2, w, ids, **kw_of(ew), tiles=tiles))
            rows.add("decode" if tiles is None else f"decode[{name}]", ew.fmt, t, ms, 2 * t * TOPK * 3 * H * INTER,
                     touched, "copy_bw", None, touched / ms / 1e6 / copy_gbs, f"experts_hit={touched // per_expert}")


def torch_loop(x, ew: ExpertWeights, w, ids, block_mm) -> float:
    """A torch loop over experts with cuBLAS, as a user without a fused kernel would write it; returns ms."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    groups = list(zip(range(E), torch.split(order, counts)))
    tok = [(e, idx // TOPK, w.flatten()[idx]) for e, idx in groups if idx.numel()]
    if ew.fmt == "fp8":
        xq, xs = quantize_fp8_per_token_group(x)
        scale_args = block_mm[0]

    def run():
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, rows_, wt in tok:
            if ew.fmt == "bf16":
                h = x[rows_] @ ew.w13[e].t()
                act = F.silu(h[:, :INTER]) * h[:, INTER:]
                y = act @ ew.w2[e].t()
            else:
                sa, sb = scale_args(xs[rows_], ew.w13_scale[e])
                h = block_mm[1](xq[rows_], ew.w13[e], sa, sb)
                aq, a_s = quantize_fp8_per_token_group(F.silu(h[:, :INTER]) * h[:, INTER:])
                y = block_mm[1](aq, ew.w2[e], *scale_args(a_s, ew.w2_scale[e]))
            out.index_add_(0, rows_, y.float() * wt[:, None])
        return out

    return do_bench(run, warmup=2, rep=10, return_mode="median")


def bench_prefill(rows: Rows, ew: ExpertWeights, t: int, sweep: bool, block_mm):
    *_, x, w, _ = routed(t, seed=1)
    # balanced routing: slot j of token i -> expert (8i + j) % 256, so every expert gets exactly T*k/E rows
    ids = (torch.arange(t * TOPK, device="cuda", dtype=torch.int32) % E).view(t, TOPK)
    flops = 2 * t * TOPK * 3 * H * INTER
    ms = graph_ms(lambda: fused_moe(x, ew.w13, ew.w2, w, ids, **kw_of(ew)))
    base = None
    if ew.fmt == "bf16" or (ew.fmt == "fp8" and block_mm):
        try:
            base = torch_loop(x, ew, w, ids, block_mm)
        except RuntimeError as e:
            log.warning("torch loop baseline for %s failed: %s", ew.fmt, str(e).splitlines()[0])
    name = {"bf16": "torch_loop_bf16_matmul", "fp8": "torch_loop_scaled_mm_block"}.get(ew.fmt, "")
    rows.add("prefill", ew.fmt, t, ms, flops, 0, name if base else "", base, base / ms if base else None)
    if sweep and ew.fmt in ("bf16", "fp8"):
        for name, tiles in (("bm128w8", dict(BLOCK_M=128, num_warps=8)), ("inkernel_q", dict(prequant=False))):
            ms_v = graph_ms(lambda: fused_moe(x, ew.w13, ew.w2, w, ids, **kw_of(ew), tiles=tiles))
            rows.add(f"prefill[{name}]", ew.fmt, t, ms_v, flops, 0, "heuristic", ms, ms / ms_v)


def dense_fp8_ms(t: int) -> float | None:
    """fp8_block_gemm on the same FLOPs as one prefill layer: [T*k, 7168] x [4096, 7168]^T and x [7168, 2048]^T."""
    try:
        from dsquant.kernels.gemm import fp8_block_gemm
    except ImportError as e:
        log.warning("fp8_block_gemm unavailable: %s", e)
        return None
    m = t * TOPK
    total = 0.0
    for n, k in ((2 * INTER, H), (H, INTER)):
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        a_s = torch.rand(m, k // 128, device="cuda") + 0.5
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        b_s = torch.rand(n // 128, k // 128, device="cuda") + 0.5
        total += graph_ms(lambda: fp8_block_gemm(a, a_s, b, b_s))
    return total


def scaled_mm_helpers():
    """(scale layout fn, block-scaled mm) from bench_gemm's checked convention, or None where cuBLAS lacks it."""
    try:
        import bench_gemm
        layout = bench_gemm.check_scaled_mm_convention()
    except Exception as e:  # the baseline is optional: a missing cuBLAS feature must not stop the run
        log.warning("no block-scaled torch._scaled_mm baseline: %s", e)
        return None
    if layout is None:
        return None
    return (lambda a_s, b_s: bench_gemm.block_scaled_mm_args(a_s, b_s, layout)), bench_gemm.block_scaled_mm


def ptxas_report(path: str) -> None:
    """Compile every kernel variant fused_moe launches at V3 decode and prefill sizes for sm_90a, no GPU needed, and
    write registers / spill bytes / MMA kind per variant (ptxas -v): the check behind the tile NOTEs in fused.py.

    The launches are captured from fused_moe calls on CPU tensors with the V3 tile choice forced (JITFunction.run is
    replaced, nothing runs); argument types and 16-divisibility follow the launcher's specialisation.
    """
    import subprocess
    import tempfile
    from pathlib import Path

    from dsquant.kernels.moe.reference import quantize_experts
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    captured: list = []
    original = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kw: captured.append((self, args, kw))
    try:
        g = torch.Generator().manual_seed(0)
        small = dict(e=8, h=256, inter=128)
        w13 = torch.randn(small["e"], 2 * small["inter"], small["h"], generator=g)
        w2 = torch.randn(small["e"], small["h"], small["inter"], generator=g)
        for fmt in ("bf16", "fp8", "int8", "nvfp4", "mxfp4"):
            ew = quantize_experts(w13, w2, fmt)
            timed = [("prefill 4 warps (timed 2026-11-25)", 16384, dict(num_warps=4))] if fmt in ("bf16", "fp8") else []
            for regime, t, change in [("decode", 64, {}), ("prefill", 16384, {})] + timed:
                x = torch.randn(4, small["h"]).bfloat16()
                ids = torch.arange(8, dtype=torch.int32).view(4, 2)
                tiles = default_tiles(t * TOPK, E, fmt) | change  # the V3 choice for this many tokens
                n0 = len(captured)
                fused_moe(x, ew.w13, ew.w2, torch.ones(4, 2), ids, **kw_of(ew), tiles=tiles)
                captured[n0:] = [(f"{regime} {fmt}",) + c for c in captured[n0:] if "align" not in c[0].__name__]
        for t, e in ((64, E), (4096, E), (64, 384), (4096, 384)):  # alignment: V3 and Kimi-K2 expert counts
            n0 = len(captured)
            moe_align(torch.zeros(t, TOPK, dtype=torch.int32), e, default_tiles(t * TOPK, e, "fp8")["BLOCK_M"])
            captured[n0:] = [(f"align T={t} E={e}",) + c for c in captured[n0:]]
        for name, e, kw in (("route V3", E, V3_ROUTER), ("route Kimi-K2", 384, dict(top_k=8))):
            n0 = len(captured)
            deepseek_route(torch.zeros(2, e), torch.zeros(e), **kw)
            captured[n0:] = [(name,) + c for c in captured[n0:]]
    finally:
        JITFunction.run = original
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["case", "kernel", "constexprs", "num_warps", "num_stages", "registers", "spill_bytes", "mma"])
        for case, fn, args, kw in captured:
            values = dict(zip(fn.arg_names, args)) | kw
            const = {n: values[n] for i, n in enumerate(fn.arg_names) if i in fn.constexprs}
            sig = {n: "constexpr" if n in const else mangle_type(values[n]) for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n not in const and (isinstance(values[n], torch.Tensor)
                                            or (isinstance(values[n], int) and values[n] % 16 == 0))}
            opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
            k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options=opts)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
                ptx.write(k.asm["ptx"])
            info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                                  capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores", info)
            regs, spill = int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1
            mma = "wgmma" if "wgmma.mma_async" in k.asm["ptx"] else "mma.sync" if "mma.sync" in k.asm["ptx"] else ""
            row = [case, fn.__name__, const, opts.get("num_warps", 4), opts.get("num_stages", ""), regs, spill, mma]
            out.writerow(row)
            log.info("%-16s %-28s warps=%s stages=%s regs=%s spill=%s %s", *row[:2], *row[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/moe_h100.csv")
    p.add_argument("--formats", default="fp8,bf16,nvfp4,int8,mxfp4")
    p.add_argument("--prefill-tokens", type=int, default=16384)
    p.add_argument("--sweep", action="store_true", help="also time tile variants around the heuristic")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip sections started after this many seconds")
    p.add_argument("--ptxas", metavar="CSV", help="only compile the kernel variants for sm_90a and report registers "
                   "and spills to CSV (runs anywhere, no GPU)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ptxas:
        ptxas_report(args.ptxas)
        return
    start = time.time()
    rows = Rows(args.out)
    log.info("%s | torch %s | triton %s | %s", *(rows.head[k] for k in ("gpu", "torch", "triton", "date")))
    copy_gbs = copy_bandwidth()
    rows.add("copy", "u8", 0, 2 * (1 << 30) / copy_gbs / 1e6, nbytes=2 * (1 << 30), note="device copy, read+write")
    bench_routing(rows, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    fmts = args.formats.split(",")
    # decode for every format first, then prefill (fp8 and bf16 have cuBLAS baselines), the dense fp8 GEMM last
    jobs = [("decode", f) for f in fmts] + [("prefill", f) for f in fmts]
    block_mm = None
    for kind, fmt in jobs:
        if time.time() - start > args.budget_s:
            log.warning("time budget reached: skipping %s %s", kind, fmt)
            continue
        ew = random_experts(fmt)
        try:
            if kind == "decode":
                bench_decode(rows, ew, copy_gbs, [1, 4, 16, 64], args.sweep)
            else:
                if fmt == "fp8" and block_mm is None:
                    block_mm = scaled_mm_helpers() or False
                bench_prefill(rows, ew, args.prefill_tokens, args.sweep, block_mm)
        except Exception as e:  # one failing format should not lose the others' figures
            log.error("%s %s failed: %s", kind, fmt, e)
        del ew
        torch.cuda.empty_cache()
    if "fp8" in fmts and time.time() - start < args.budget_s:
        dense = dense_fp8_ms(args.prefill_tokens)
        if dense:
            rows.add("dense_gemm", "fp8", args.prefill_tokens, dense, 2 * args.prefill_tokens * TOPK * 3 * H * INTER,
                     note="fp8_block_gemm [T*k,7168]x[4096,7168]^T + [T*k,2048]x[7168,2048]^T: same FLOPs")


if __name__ == "__main__":
    main()
