"""Quant kernel bandwidth: GB/s (bytes read + written, each byte once) against a device-to-device copy
measured in the same run: medians of triton.testing.do_bench_cudagraph (kernel time without the Python
launch cost, which is ~45 us per call on the lent H100 host and would hide a 40 us kernel), each replay
reading its own copy of the inputs so that the 50 MB L2 cannot serve them.

    python benchmarks/bench_quant.py --out benchmarks/results/quant_h100.csv [--png quant_h100.png] [--sweep]

Activations are [rows, 7168] bf16 (DeepSeek-V3 hidden size) at 4096 and 16384 rows; weight kernels run on
(4096, 7168), (7168, 2048) and (36864, 7168). `--sweep` first times the tile choices of the
FP4 quantizers (elements per program and per thread), the SiLU kernel's tile and the fast divisions against
tl.div_rn, so a retune is a measured choice (results/quant_h100_sweep.csv).
Latency rows time single small calls both ways: a CUDA graph (kernel only) and eager (launch included).
Bytes count what a kernel must move: the NVFP4 variant with a computed global scale reads its input
twice (amax pre-pass, then quantize) but is credited one read, so its figure shows the cost of that pass.
Outputs are allocated by each call and the caching allocator hands back the same block, so an output
smaller than L2 can be absorbed there (7168 x 2048 dequantization, 29 MB written, shows 115% of copy);
the 16384-row figures are free of that.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import logging
import os
from pathlib import Path

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
import triton
from dsquant.kernels import quant
from dsquant.kernels.quant import reference as ref
from dsquant.kernels.quant import triton as fp8_kernels
from dsquant.kernels.quant import triton_fp4 as fp4_kernels
from triton.testing import do_bench, do_bench_cudagraph

log = logging.getLogger("bench_quant")
DEVICE = "cuda"
HIDDEN = 7168
WEIGHTS = ((4096, 7168), (7168, 2048), (36864, 7168))
FIELDS = ["date", "gpu", "torch", "triton", "kernel", "shape", "config", "timer", "time_us", "bytes", "gbps",
          "copy_gbps", "pct_of_copy"]
ROTATE_BYTES = 256 << 20  # inputs per replay cycle: 5x the H100's 50 MB L2


def _median_ms(fn, timer: str = "cudagraph") -> float:
    if timer == "cudagraph":
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rotating(fn, *inputs: torch.Tensor):
    """fn cycling over enough copies of its inputs that consecutive calls stream them from HBM, not L2."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs)
    copies = [inputs] + [tuple(t.clone() for t in inputs) for _ in range(-(-ROTATE_BYTES // nbytes) - 1)]
    cycle = itertools.cycle(copies)
    return lambda: fn(*next(cycle))


class Recorder:
    """Times cases, pairs each with the copy bandwidth at its input size, appends CSV rows as it goes."""

    def __init__(self, path: Path):
        self.meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
                         torch=torch.__version__, triton=triton.__version__)
        self.path = path
        self.copy_gbps: dict[int, float] = {}
        self.rows: list[dict] = []
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=FIELDS)
        if new:
            self.writer.writeheader()

    def copy(self, numel: int, timer: str = "cudagraph") -> float:
        """Device copy of `numel` bf16 elements: GB/s counting the read and the write."""
        if (numel, timer) not in self.copy_gbps:
            src = torch.randn(numel, device=DEVICE, dtype=torch.bfloat16)
            ms = _median_ms(rotating(lambda a, b: b.copy_(a), src, torch.empty_like(src)), timer)
            self.copy_gbps[numel, timer] = 2 * src.numel() * 2 / ms / 1e6
            self._write("copy", (numel,), "torch copy_", timer, ms, 4 * numel, self.copy_gbps[numel, timer])
        return self.copy_gbps[numel, timer]

    def case(self, kernel: str, shape, config: str, fn, nbytes: int, ref_numel: int, timer: str = "cudagraph"):
        try:
            ms = _median_ms(fn, timer)
        except Exception as err:  # one failing case must not lose the rest of the table
            log.error("%s %s %s failed: %r", kernel, shape, config, err)
            return
        self._write(kernel, shape, config, timer, ms, nbytes, self.copy(ref_numel, timer))

    def _write(self, kernel, shape, config, timer, ms, nbytes, copy_gbps):
        gbps = nbytes / ms / 1e6
        row = dict(self.meta, kernel=kernel, shape="x".join(map(str, shape)), config=config, timer=timer,
                   time_us=f"{ms * 1e3:.2f}", bytes=nbytes, gbps=f"{gbps:.0f}", copy_gbps=f"{copy_gbps:.0f}",
                   pct_of_copy=f"{100 * gbps / copy_gbps:.1f}")
        self.rows.append(row)
        self.writer.writerow(row)
        self.file.flush()
        log.info("%-24s %-12s %-30s %-9s %9s us %6s GB/s %5s%% of copy", kernel, row["shape"], config, timer,
                 row["time_us"], row["gbps"], row["pct_of_copy"])


def bench_activations(rec: Recorder, m: int, with_reference: bool):
    k = HIDDEN
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    n = m * k
    groups = 4 * n // 128
    fp8 = 2 * n + n + groups  # bf16 in, e4m3 out, float32 scale per 128
    shape = (m, k)
    group = quant.quantize_fp8_per_token_group
    rec.case("fp8_per_token_group", shape, "row-major", rotating(group, x), fp8, n)
    rec.case("fp8_per_token_group", shape, "column-major",
             rotating(lambda t: group(t, column_major_scales=True), x), fp8, n)
    rec.case("fp8_per_token_group", shape, "ue8m0", rotating(lambda t: group(t, ue8m0=True), x), fp8, n)
    rec.case("fp8_per_token", shape, "", rotating(quant.quantize_fp8_per_token, x), 3 * n + 4 * m, n)
    rec.case("int8_per_token", shape, "", rotating(quant.quantize_int8_per_token, x), 3 * n + 4 * m, n)
    gate_up = torch.randn(m, 2 * k, device=DEVICE, dtype=torch.bfloat16)
    rec.case("silu_mul_quantize_fp8", (m, 2 * k), "", rotating(quant.silu_mul_quantize_fp8, gate_up),
             4 * n + n + groups, 2 * n)
    nv = 2 * n + n // 2 + n // 16
    gs = torch.tensor(0.01, device=DEVICE)
    rec.case("nvfp4", shape, "global scale given", rotating(lambda t: quant.quantize_nvfp4(t, gs), x), nv + 4, n)
    rec.case("nvfp4", shape, "global scale computed", rotating(quant.quantize_nvfp4, x), nv + 4, n)
    mx = 2 * n + n // 2 + n // 32
    rec.case("mxfp4", shape, "ocp", rotating(quant.quantize_mxfp4, x), mx, n)
    packed, block_scale, g = quant.quantize_nvfp4(x, gs)
    rec.case("dequantize_nvfp4", shape, "", rotating(lambda p, b: quant.dequantize_nvfp4(p, b, g), packed, block_scale),
             nv + 4, n)
    packed, scale = quant.quantize_mxfp4(x)
    rec.case("dequantize_mxfp4", shape, "", rotating(quant.dequantize_mxfp4, packed, scale), mx, n)
    if with_reference:  # the pure-torch references, eager (they sync on their NaN check: no CUDA graph)
        rec.case("fp8_per_token_group", shape, "torch reference (eager)",
                 rotating(ref.quantize_fp8_per_token_group_ref, x), fp8, n, timer="do_bench")
        rec.case("nvfp4", shape, "torch reference (eager)", rotating(lambda t: ref.quantize_nvfp4_ref(t, gs), x),
                 nv + 4, n, timer="do_bench")


def bench_weights(rec: Recorder):
    for n_out, k in WEIGHTS:
        w = torch.randn(n_out, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
        n = n_out * k
        scales = 4 * triton.cdiv(n_out, 128) * triton.cdiv(k, 128)
        shape = (n_out, k)
        rec.case("fp8_block", shape, "", rotating(quant.quantize_fp8_block, w), 3 * n + scales, n)
        q, s = quant.quantize_fp8_block(w)
        rec.case("dequantize_fp8_block", shape, "", rotating(quant.dequantize_fp8_block, q, s), 3 * n + scales, n)
        rec.case("nvfp4", shape, "weight, global scale computed", rotating(quant.quantize_nvfp4, w),
                 2 * n + n // 2 + n // 16 + 4, n)
        rec.case("mxfp4", shape, "weight, ocp", rotating(quant.quantize_mxfp4, w), 2 * n + n // 2 + n // 32, n)
        del w, q, s
        torch.cuda.empty_cache()


def sweep(rec: Recorder, m: int):
    """The tuning choices of the kernels that were below 85% of copy, timed in one run against the same copy: tile
    size (elements per program) and elements per thread of the FP4 quantizers, the SiLU kernel's tile, and the
    fast divisions against tl.div_rn per element (the old path). Labels name the module knobs set (the run of
    quant_h100_sweep.csv set one QUANT_TILE_ELEMS for both FP4 kernels, since split into NVFP4_ and MXFP4_)."""
    x = torch.randn(m, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(m, 2 * HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    n = m * HIDDEN
    gs = torch.tensor(0.01, device=DEVICE)
    nv, mx, silu = 2 * n + n // 2 + n // 16 + 4, 2 * n + n // 2 + n // 32, 5 * n + 4 * n // 128
    cases = {  # kernel -> (timed fn, bytes, copy size, shape)
        "nvfp4 gs given": (rotating(lambda t: quant.quantize_nvfp4(t, gs), x), nv, n, (m, HIDDEN)),
        "nvfp4 gs computed": (rotating(quant.quantize_nvfp4, x), nv, n, (m, HIDDEN)),
        "mxfp4": (rotating(quant.quantize_mxfp4, x), mx, n, (m, HIDDEN)),
        "silu_mul_quantize_fp8": (rotating(quant.silu_mul_quantize_fp8, gate_up), silu, 2 * n, (m, 2 * HIDDEN)),
    }
    tiles = (1024, 2048, 4096, 8192)
    variants = (
        [("nvfp4 gs given", dict(NVFP4_TILE_ELEMS=t, QUANT_ELEMS_PER_THREAD=e)) for t in tiles for e in (32, 64)]
        + [("nvfp4 gs given", dict(NVFP4_TILE_ELEMS=t, NVFP4_FAST_DIVISION=False)) for t in (1024, 8192)]  # old div
        + [("nvfp4 gs computed", {})]
        + [("mxfp4", dict(MXFP4_TILE_ELEMS=t)) for t in tiles]
        + [("silu_mul_quantize_fp8", dict(SILU_TILE_ELEMS=t)) for t in tiles]
        + [("silu_mul_quantize_fp8", dict(SILU_TILE_ELEMS=2048, SILU_FAST_DIVISION=False))]  # old division
    )
    modules = [fp8_kernels, fp4_kernels]
    for kernel, change in variants:
        saved = {(mod, k): getattr(mod, k) for mod in modules for k in change if hasattr(mod, k)}
        try:
            for (mod, k) in saved:
                setattr(mod, k, change[k])
            fn, nbytes, copy_numel, shape = cases[kernel]
            label = " ".join(f"{k}={v}" for k, v in change.items()) or "default"
            rec.case(kernel, shape, f"sweep {label}", fn, nbytes, copy_numel)
        finally:
            for (mod, k), v in saved.items():
                setattr(mod, k, v)


def latency(rec: Recorder):
    """Small batches: time per call, kernel only (CUDA graph) and eager (Python and launch included)."""
    for m in (1, 128):
        x = torch.randn(m, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
        gate_up = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16)
        n = m * HIDDEN
        for timer in ("cudagraph", "do_bench"):
            rec.case("fp8_per_token_group", (m, HIDDEN), "latency", lambda: quant.quantize_fp8_per_token_group(x),
                     3 * n + 4 * n // 128, n, timer=timer)
            rec.case("silu_mul_quantize_fp8", (m, 4096), "latency", lambda: quant.silu_mul_quantize_fp8(gate_up),
                     2 * m * 4096 + m * 2048 + 4 * m * 16, m * 4096, timer=timer)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return False
    main = [r for r in rows if r["kernel"] != "copy" and r["timer"] == "cudagraph"
            and not r["config"].startswith(("sweep", "latency"))]
    labels = [f"{r['kernel']} {r['config']} {r['shape']}".replace("  ", " ") for r in main]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(main) + 1.5))
    ax.barh(range(len(main)), [float(r["gbps"]) for r in main], color="tab:blue")
    ceiling = max(float(r["copy_gbps"]) for r in main)  # the largest copy; smaller sizes copy a little slower
    ax.axvline(ceiling, color="black", label=f"device copy {ceiling:.0f} GB/s (measured)")
    ax.axvline(0.85 * ceiling, color="tab:red", linestyle="--", label="85% of copy (target)")
    ax.set_yticks(range(len(main)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (bytes read + written)")
    ax.set_title(f"dsquant quantizers, {rows[0]['gpu']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_h100.csv"))
    parser.add_argument("--png", type=Path, default=None, help="bar chart of GB/s against the copy ceiling")
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--sweep", action="store_true", help="also time tile sizes and the tl.div_rn path")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep alone, at the largest --rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    rec = Recorder(args.out)
    log.info("gpu %s | torch %s | triton %s | driver %s", rec.meta["gpu"], torch.__version__, triton.__version__,
             os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip())
    if args.sweep or args.sweep_only:  # first: the variants decide the defaults
        sweep(rec, max(args.rows))
    if not args.sweep_only:
        for m in args.rows:
            bench_activations(rec, m, with_reference=m == args.rows[0])
        bench_weights(rec)
        latency(rec)
    if args.png is not None:
        plot(rec.rows, args.png)


if __name__ == "__main__":
    main()
