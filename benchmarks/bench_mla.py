"""MLA decode over the paged latent cache: GB/s on KV bytes (h_q 16/64) and TFLOPS (h_q 128), H100.

Baselines measured in the same run:
    copy        device-to-device copy bandwidth (bytes read + written), the memory roofline;
    torch       gather the pages, dequantize to bf16, cuBLAS bmm for Q.K^T and P.V (float32 softmax);
    torch_attn  the same matmuls on a pre-gathered, pre-dequantized bf16 cache (reads 1152 B/token).
KV bytes count each cached token once at the cache dtype's size (1152 / 576 / 656 B); FLOPs are
2 * B * H * ctx * (576 + 512). Besides the default schedule, a few tile configs and split counts
are timed so the CSV shows what the defaults leave on the table.

    PYTHONPATH=. python3 benchmarks/bench_mla.py --precompile 16   # optional: compile all variants in parallel
    PYTHONPATH=. python3 benchmarks/bench_mla.py --out benchmarks/results/mla_h100.csv
    PYTHONPATH=. python3 benchmarks/bench_mla.py --sass benchmarks/results/mla_sm90_sass.csv  # no GPU needed
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import os
import time

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
import triton
from dsquant.kernels.mla import allocate_kv_cache, cache_store, kv_cache_bytes_per_token, mla_decode, mla_prefill
from dsquant.kernels.mla.cache import dequantize_kv_tokens
from dsquant.kernels.mla.configs import GLUON_CONFIG, portable_config, programs_per_sm
from dsquant.kernels.mla.triton import AttendConfig, default_config, default_num_splits
from dsquant.kernels.testing import calc_diff
from timing import copy_bandwidth  # benchmarks/ is the script's folder
from triton.testing import do_bench

log = logging.getLogger("bench_mla")
PAGE = 64
DEVICE = "cuda"
SCALE = 576**-0.5
FIELDS = ["date", "gpu", "torch", "triton", "kernel", "kv_dtype", "batch", "heads", "context", "page_size",
          "config", "num_splits", "time_us", "kv_gbps", "pct_copy_bw", "tflops", "vs_torch", "diff_vs_torch"]


def _time_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def build_cache(kind: str, batch: int, ctx: int):
    """A fully used cache: pages shuffled so the block table really gathers; filled by cache_store."""
    n_pages = batch * ctx // PAGE
    cache = allocate_kv_cache(n_pages, PAGE, kind, device=DEVICE)
    bt = torch.randperm(n_pages, device=DEVICE).to(torch.int32).reshape(batch, ctx // PAGE)
    kv_scale = torch.tensor(0.05, device=DEVICE) if kind == "fp8" else None
    step = 1 << 20
    slots_all = (bt.long()[:, :, None] * PAGE + torch.arange(PAGE, device=DEVICE)).reshape(-1)
    for i in range(0, slots_all.numel(), step):
        slots = slots_all[i : i + step]
        kv_c = torch.randn(slots.numel(), 512, device=DEVICE, dtype=torch.bfloat16)
        k_pe = torch.randn(slots.numel(), 64, device=DEVICE, dtype=torch.bfloat16)
        cache_store(kv_c, k_pe, cache, slots, kv_scale=kv_scale)
    return cache, bt, kv_scale, slots_all.reshape(batch, ctx)


def torch_decode(q, cache, slots, kv_scale):
    """Baseline: gather + dequantize to bf16, then cuBLAS bmm. q [B, H, 576] bf16 -> [B, H, 512]."""
    kv_c, k_pe = dequantize_kv_tokens(cache, slots.reshape(-1), kv_scale)
    k = torch.cat([kv_c, k_pe], dim=-1).to(torch.bfloat16).reshape(slots.shape[0], slots.shape[1], 576)
    return torch_attend(q, k)


def torch_attend(q, k):
    s = torch.bmm(q, k.transpose(1, 2)).float() * SCALE  # [B, H, ctx]
    p = torch.softmax(s, dim=-1).to(torch.bfloat16)
    return torch.bmm(p, k[:, :, :512])


def sweep_configs(heads: int, kind: str) -> list[AttendConfig]:
    """The default tile config first, then the alternatives worth timing at this head count and cache dtype."""
    c = AttendConfig
    if kind == "bf16":
        extra = {16: [c(16, 64, 8, 3), c(16, 32, 4, 3), c(16, 64, 4, 3)],
                 64: [c(64, 64, 8, 2), c(64, 32, 8, 3), c(64, 64, 8, 1)]}
    else:  # fp8 tiles on float16 MMAs read twice ("reload", r) or via one float16 shared tile ("smem", m; with
        # 16-bit operand layouts "smem16", m16), or dequantized to bf16 tiles ("dequant", d)
        # at 16 heads also the Gluon kernel ("gluon", g), the portable default and the token-major Triton
        # kernel ("tokens", t)
        extra = {16: [GLUON_CONFIG, portable_config(16, kind), c(16, 64, 4, 2, "tokens"), c(16, 64, 4, 2, "reload"),
                      c(16, 32, 4, 3, "reload"), c(16, 32, 4, 3, "smem"),
                      c(16, 32, 4, 3, "smem16"), c(16, 64, 4, 2, "smem16"), c(16, 32, 4, 2, "smem16"),
                      c(16, 64, 8, 2, "smem16"), c(16, 64, 4, 2, "dequant")],
                 64: [c(64, 64, 8, 2, "smem"), c(64, 64, 8, 2, "smem16"), c(64, 64, 8, 2, "reload"),
                      c(64, 64, 8, 2, "dequant"), c(64, 32, 8, 2, "dequant")]}
    base = default_config(heads, kind)
    return [base] + [x for x in extra[min(heads, 64)] if x != base]


def _precompile_one(job) -> str:
    """Run one (kind, heads, config, split, page, prefill) combination at a tiny size to fill the
    on-disk Triton cache; the specializations match full-size calls (sizes are not specialized)."""
    try:
        return _run_tiny(*job)
    except Exception as e:  # a config out of shared memory: the timing run records it too
        return f"FAILED {job}: {str(e).splitlines()[0][:200]}"


def _run_tiny(kind, heads, cfg, splits, page, prefill) -> str:
    cache = allocate_kv_cache(4, page, kind, device=DEVICE)
    kv_scale = torch.tensor(1.0, device=DEVICE) if kind == "fp8" else None
    bt = torch.arange(4, dtype=torch.int32, device=DEVICE).reshape(2, 2)
    lens = torch.tensor([page, 2 * page], dtype=torch.int32, device=DEVICE)
    rows = 3 if prefill else 2
    qn = torch.zeros(rows, heads, 512, device=DEVICE, dtype=torch.bfloat16)
    qp = torch.zeros(rows, heads, 64, device=DEVICE, dtype=torch.bfloat16)
    if prefill:
        qsl = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
        mla_prefill(qn, qp, cache, bt, lens, qsl, SCALE, kv_scale=kv_scale, config=cfg)
    else:
        mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale, num_splits=splits, config=cfg)
    torch.cuda.synchronize()
    return f"{kind} H{heads} {cfg} splits={splits} page={page} prefill={prefill}"


def precompile(workers: int) -> None:
    """Compile every kernel variant the GPU tests and this benchmark use, in parallel processes."""
    import multiprocessing as mp

    jobs = []
    for kind in ("bf16", "fp8", "fp8_ds"):
        for heads in (16, 64):  # 128 heads compile the same variants as 64 (head count is not specialized on)
            for cfg in sweep_configs(heads, kind):
                jobs += [(kind, heads, cfg, 1, PAGE, False), (kind, heads, cfg, 2, PAGE, False)]
        jobs.append((kind, 128, default_config(128, kind), 1, PAGE, True))  # GPU prefill test
    jobs.append(("fp8_ds", 64, default_config(64, "fp8_ds"), 2, 16, False))  # GPU page-16 test
    jobs += [(kind, 16, AttendConfig(16, 32, 4, 3, tile), 2, PAGE, False)  # GPU tile-schedule tests
             for kind in ("fp8", "fp8_ds") for tile in ("regs", "dequant")]
    with mp.get_context("spawn").Pool(workers) as pool:
        for done in pool.imap_unordered(_precompile_one, jobs):
            log.info("compiled %s", done)


def timed_configs(heads: int, kind: str, sweep: bool) -> list[AttendConfig]:
    """The default first; then the sweep, or without it the Gluon config (fp8 caches, <= 16 heads) and the
    portable config where they differ from the default."""
    if sweep:
        return sweep_configs(heads, kind)
    gluon = [GLUON_CONFIG] if kind != "bf16" and heads <= 16 else []
    return list(dict.fromkeys([default_config(heads, kind), *gluon, portable_config(heads, kind)]))


def bench_case(writer, meta, copy_bw, kind, batch, heads, ctx, cache, bt, kv_scale, slots, sweep):
    qn = torch.randn(batch, heads, 512, device=DEVICE, dtype=torch.bfloat16)
    qp = torch.randn(batch, heads, 64, device=DEVICE, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    kv_bytes = batch * ctx * kv_cache_bytes_per_token(kind)
    flops = 2 * batch * heads * ctx * (576 + 512)
    q = torch.cat([qn, qp], dim=-1)
    k_bf16 = torch.cat(dequantize_kv_tokens(cache, slots.reshape(-1), kv_scale), -1).to(torch.bfloat16)
    k_bf16 = k_bf16.reshape(batch, ctx, 576)
    t_torch = _time_ms(lambda: torch_decode(q, cache, slots, kv_scale))
    t_attn = _time_ms(lambda: torch_attend(q, k_bf16))
    # Full-size agreement with the baseline (bf16 P and bf16 K in the baseline: ~1e-5 expected).
    check = calc_diff(mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale), torch_attend(q, k_bf16))
    k_bf16 = None  # free the bf16 copy before the kernel timings

    def row(kernel, config, splits, ms):
        gbps = kv_bytes / ms / 1e6
        writer.writerow(dict(meta, kernel=kernel, kv_dtype=kind, batch=batch, heads=heads, context=ctx,
                             page_size=PAGE, config=config, num_splits=splits, time_us=f"{ms * 1e3:.1f}",
                             kv_gbps=f"{gbps:.0f}", pct_copy_bw=f"{100 * gbps / copy_bw:.1f}",
                             tflops=f"{flops / ms / 1e9:.1f}", vs_torch=f"{t_torch / ms:.2f}",
                             diff_vs_torch=f"{check:.1e}"))
        log.info("%-10s %-6s H=%-3d ctx=%-5d %-28s splits=%-3s %8.1f us %6.0f GB/s (%4.1f%% copy) %6.1f TF",
                 kernel, kind, heads, ctx, config, splits, ms * 1e3, gbps, 100 * gbps / copy_bw, flops / ms / 1e9)

    row("torch", "gather+dequant+bmm", "", t_torch)
    row("torch_attn", "bmm on bf16 copy", "", t_attn)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132
    for i, cfg in enumerate(timed_configs(heads, kind, sweep)):
        auto = default_num_splits(batch, heads, ctx, kind, cfg.block_h, n_sms, programs_per_sm(cfg))
        for splits in sorted({max(1, auto // 2), auto, auto + 1, 2 * auto, 4 * auto}) if (sweep and i == 0) else [auto]:
            try:
                ms = _time_ms(lambda: mla_decode(qn, qp, cache, bt, lens, SCALE, kv_scale=kv_scale,
                                                 num_splits=splits, config=cfg))
            except Exception as e:  # a config out of shared memory / registers: record and go on
                log.warning("%s %s: %s", kind, cfg, str(e).splitlines()[0][:200])
                continue
            name = "triton" if (i == 0 and splits == auto) else "triton_sweep" if sweep else f"triton_{cfg.tile}"
            row(name, str(cfg), splits, ms)


def sass_report(path: str) -> None:
    """Compile the decode kernel's sweep variants for sm_90a (no GPU needed) and write, per variant, registers,
    spill bytes, shared memory and the SASS instruction count of the KV loop per warp and per token: the static
    side of the tile-schedule choice (the fp8 tiles are issue-bound where bf16 is memory-bound)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from dsquant.kernels import format_codes
    from dsquant.kernels.mla.configs import TILE_CODE
    from dsquant.kernels.mla.triton import mla_attend_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    fn = mla_attend_kernel
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["kv_dtype", "config", "registers", "spill_bytes", "shared_bytes", "loop_sass_per_warp",
                      "loop_sass_per_token"])
        for kind in ("bf16", "fp8", "fp8_ds"):
            ds = kind == "fp8_ds"
            vals = "*bf16" if kind == "bf16" else "*fp8e4nv"
            for cfg in dict.fromkeys(sweep_configs(16, kind) + sweep_configs(64, kind)):
                if cfg.tile in ("tokens", "gluon"):  # other kernels than mla_attend_kernel
                    continue
                const = dict(PAGE_SIZE=PAGE, KV_FMT=format_codes.KV_CACHE_FORMATS[kind], HAS_ROW_SEQ=False, SPLIT=True,
                             VAL_W=656 if ds else 576,
                             SC_W=164 if ds else 576, SC_OFF=128 if ds else 0, PE_W=328 if ds else 576,
                             PE_OFF=264 if ds else 512, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, DR=64, GROUP=128,
                             TILE=TILE_CODE[cfg.tile], MMA_BF16=kind == "bf16" or cfg.tile == "dequant",
                             EV="evict_last" if cfg.tile == "reload" else "", ASM=True)
                ptrs = dict(qn_ptr="*bf16", qp_ptr="*bf16", val_ptr=vals, sc_ptr="*fp32" if ds else vals,
                            pe_ptr="*bf16" if ds else vals, kv_scale_ptr="*fp32", bt_ptr="*i32", row_seq_ptr="*i32",
                            row_len_ptr="*i32", o_ptr="*fp32", lse_ptr="*fp32")
                sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n == "qk_scale" else "i32")
                       for n in fn.arg_names}
                attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ptrs}
                k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                with tempfile.TemporaryDirectory() as tmp:
                    ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
                    ptx.write_text(k.asm["ptx"])
                    info = subprocess.run([str(bindir / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                                          capture_output=True, text=True, check=True).stderr
                    sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                          text=True, check=True).stdout
                ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]+)\*/\s+([^;]*);", sass)]
                pos = {a: i for i, (a, _) in enumerate(ins)}
                back = [i - pos[int(t, 16)] + 1 for i, (a, b) in enumerate(ins)
                        for t in re.findall(r"BRA\s+(?:`\()?0x([0-9a-f]+)", b) if int(t, 16) < a and int(t, 16) in pos]
                loop = max(back, default=0)  # the KV loop: the longest backward branch
                regs = re.search(r"Used (\d+) registers", info).group(1)
                spill = re.search(r"(\d+) bytes spill stores", info).group(1)
                out.writerow([kind, str(cfg), regs, spill, k.metadata.shared, loop,
                              f"{loop * cfg.num_warps / cfg.block_n:.0f}"])
                log.info("%s %s: %s regs, %s B spills, loop %d SASS/warp", kind, cfg, regs, spill, loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/mla_h100.csv")
    parser.add_argument("--no-sweep", action="store_true", help="time the default schedule only")
    parser.add_argument("--kv-dtypes", default="bf16,fp8,fp8_ds")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", default="16,64,128")
    parser.add_argument("--contexts", default="4096,32768", help="h_q 16/64/128 each; the first context with the sweep")
    parser.add_argument("--precompile", type=int, default=0, metavar="N",
                        help="only compile every variant the GPU tests and this benchmark use, with N processes")
    parser.add_argument("--sass", metavar="CSV", help="only write sm_90a register / SASS counts per variant (no GPU)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip the remaining cases after this many seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.sass:
        sass_report(args.sass)
        return
    if args.precompile:
        precompile(args.precompile)
        return
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__)
    log.info("%s | torch %s | triton %s", meta["gpu"], meta["torch"], meta["triton"])
    start = time.time()
    copy_bw = copy_bandwidth()
    log.info("device copy: %.0f GB/s", copy_bw)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(dict(meta, kernel="copy", time_us="", kv_gbps=f"{copy_bw:.0f}", pct_copy_bw="100.0"))
        # The first context with the sweep, the longer ones on the default schedule.
        contexts = [int(c) for c in args.contexts.split(",")]
        for ctx in contexts:
            batch, head_list = args.batch, [int(h) for h in args.heads.split(",")]
            for kind in args.kv_dtypes.split(","):
                cache, bt, kv_scale, slots = build_cache(kind, batch, ctx)
                for heads in head_list:
                    if args.budget_s and time.time() - start > args.budget_s:
                        log.warning("time budget reached: skipping %s H=%d ctx=%d", kind, heads, ctx)
                        continue
                    bench_case(writer, meta, copy_bw, kind, batch, heads, ctx, cache, bt, kv_scale, slots,
                               sweep=not args.no_sweep and ctx == contexts[0])
                    f.flush()
                del cache, bt, slots
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
