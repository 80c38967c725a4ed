"""Conversion speed: GB/s of source processed by `convert`, against the raw read speed of the same files (and the
raw read + write time of the source and output bytes, since both share the disk) and a
naive baseline (straightforward torch: whole tensors, one format op at a time), all measured in this run.

    python benchmarks/bench_convert.py --size-gb 2 --recipes fp8-block int8 nvfp4 mxfp4 --workers 1 2 \
        --out benchmarks/results/convert_cpu.csv

The synthetic source has DeepSeek-V3's expert and attention shapes (hidden 7168, experts 2048 x 7168, q_lora 1536,
kv_lora 512), one dense and one MoE layer, no MTP layer. `--family v4` converts a DeepSeek-V4 (Flash) source in the
official layout instead (FP8 dense linears, MXFP4 experts 1024 x 2048, --v4-experts per layer, five layers and the
MTP draft; no naive baseline, the V4 recipes transcode rather than quantize):

    python benchmarks/bench_convert.py --family v4 --recipes fp8-block nvfp4 --workers 1 --repeat 1 \
        --out benchmarks/results/convert_v4_cpu.csv
 Page cache is dropped for the source files before every
measured pass (posix_fadvise DONTNEED), so each pass reads the same way; each figure is the fastest of --repeat
runs, since the CPU host is shared. Rows are appended to the CSV with host, cores, torch, triton and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsquant import formats
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.synth import make_synthetic_checkpoint
from dsquant.checkpoint.synth_v4 import make_synthetic_v4_checkpoint
from dsquant.convert import convert
from dsquant.convert.plan import build_plan
from dsquant.formats.ondisk import write_quantized
from dsquant.formats.weight import QuantizedWeight
from dsquant.recipe import load_recipe

EXPERT_BYTES = 3 * 2048 * 7168 * 2  # one BF16 expert (gate, up, down)
out_bytes: dict[str, int] = {}  # recipe -> bytes of its last output, for the raw-write baseline


def make_source(root: Path, size_gb: float, source: str) -> Path:
    # One dense and one MoE layer and no MTP layer: on DeepSeek-V3 the MTP layer is 1/62 of the model, and the
    # recipes that keep it BF16 would otherwise turn half of this small model into plain copies.
    experts = max(2, round(size_gb * 1e9 / EXPERT_BYTES))
    return make_synthetic_checkpoint(
        root / f"src-{source}", source=source, num_shards=max(2, round(size_gb / 0.5)), hidden_size=7168,
        moe_intermediate_size=2048, intermediate_size=4096, q_lora_rank=1536, kv_lora_rank=512,
        num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=2, first_k_dense_replace=1,
        num_nextn_predict_layers=0, n_routed_experts=experts, n_group=1)


def make_v4_source(root: Path, experts: int) -> Path:
    # Flash's layer kinds (sliding, CSA, HCA, hash routing, MTP) at hidden 2048: experts are most of the bytes, as in
    # the release, and one source is a few hundred MB.
    return make_synthetic_v4_checkpoint(root / "src-v4", variant="flash", num_shards=4, hidden_size=2048,
                                        moe_intermediate_size=1024, n_routed_experts=experts)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def drop_cache(folder: Path) -> None:
    for p in folder.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(src: Path) -> float:
    drop_cache(src)
    start, buf = time.perf_counter(), bytearray(1 << 24)
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def raw_write(folder: Path, nbytes: int) -> float:
    """Seconds to write and fsync `nbytes` into one new file of `folder`: the disk's share of a conversion that
    writes that many bytes (reads and writes share the device, so read + write time bounds the convert time)."""
    buf = os.urandom(1 << 24)
    path = folder / "raw-write.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(0, nbytes, len(buf)):
            f.write(buf)
        os.fsync(f.fileno())
    secs = time.perf_counter() - start
    path.unlink()
    return secs


def naive(src: Path, dst: Path, recipe: str, convention: str, device: str = "cpu") -> float:
    """Whole tensors, one reference op after another (on `device`), a shard dict saved with save_file."""
    drop_cache(src)
    start = time.perf_counter()
    ckpt = Checkpoint(src)
    plan = build_plan(ckpt, load_recipe(recipe), convention, 5 * 10**9)
    dst.mkdir(parents=True, exist_ok=True)
    for shard in plan.shards:
        out = {}
        for item in shard.items:
            for job in item:
                for name in job.sources:
                    if name.endswith("_scale_inv"):
                        continue
                    with safe_open(src / ckpt.weight_map[name], framework="pt") as f:
                        w = f.get_tensor(name).to(device)
                        if job.fp8_source:
                            scale = f.get_tensor(name + "_scale_inv").to(device)
                            w = formats.dequantize_fp8_block(w, scale, dtype=torch.float32)
                    if job.action != "quant":
                        out[name] = (w.to(torch.bfloat16) if job.fp8_source else w).cpu()
                        continue
                    rule = job.rule
                    if job.fmt == "fp8-block":
                        qw = QuantizedWeight(job.fmt, *formats.quantize_fp8_block(w.float(), ue8m0=rule.ue8m0))
                    elif job.fmt == "int8":
                        qw = QuantizedWeight(job.fmt, *formats.quantize_int8_per_channel(w.float()))
                    elif job.fmt == "nvfp4":
                        q, s, g = formats.quantize_nvfp4(w.float())
                        qw = QuantizedWeight(job.fmt, q, s, g, torch.tensor(rule.input_scale))
                    else:
                        qw = QuantizedWeight(job.fmt, *formats.quantize_mxfp4(w.float(), scale_rule=rule.scale_rule))
                    out.update({k: v.cpu() for k, v in write_quantized(job.module, qw, convention).items()})
        save_file(out, str(dst / shard.file))
    return time.perf_counter() - start


def dsquant_convert(src: Path, dst: Path, recipe: str, workers: int, device: str = "cpu") -> float:
    drop_cache(src)
    summary = convert(src, dst, recipe, workers=workers, device=device, progress=False, max_shard_size="2GB")
    return summary.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="source checkpoint size (BF16 GB)")
    ap.add_argument("--source", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--family", default="v3", choices=["v3", "v4"], help="DeepSeek-V3 (HF names) or V4 (official)")
    ap.add_argument("--v4-experts", type=int, default=12, help="routed experts per V4 layer (source size)")
    ap.add_argument("--recipes", nargs="+", default=["fp8-block", "int8", "nvfp4", "mxfp4"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_cpu.csv"))
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (naive baseline runs there too)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest counts (shared hosts)")
    ap.add_argument("--label", default="", help="what this run measures (e.g. the code version), a CSV column")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.ERROR)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    host = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            **({"cpu_model": cpu_model(), "family": "v4"} if args.family == "v4" else {}), "gpu": gpu,
            "torch": torch.__version__, "triton": _triton_version(), "label": args.label,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    print(" ".join(f"{k}={v}" for k, v in host.items()), flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.tmp))
    rows = []
    try:
        v4 = args.family == "v4"
        src = make_v4_source(root, args.v4_experts) if v4 else make_source(root, args.size_gb, args.source)
        source = "fp8+mxfp4" if v4 else args.source
        nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        read_s = min(raw_read(src) for _ in range(args.repeat))
        print(f"source {nbytes / 1e9:.2f} GB ({source}); raw read {nbytes / 1e9 / read_s:.2f} GB/s", flush=True)
        for recipe in args.recipes:
            convention = convert(src, root / "plan", recipe, dry_run=True).convention if v4 else \
                load_recipe(recipe).conventions[0]
            naive_s = None if v4 else min(_timed_naive(src, root / f"naive-{recipe}", recipe, convention, args.device)
                                          for _ in range(args.repeat))
            base = {**host, "device": args.device, "repeat": args.repeat, "recipe": recipe, "convention": convention,
                    "source": source,
                    "source_gb": round(nbytes / 1e9, 3), "read_gb_s": round(nbytes / 1e9 / read_s, 3),
                    "naive_gb_s": round(nbytes / 1e9 / naive_s, 4) if naive_s else ""}
            for workers in args.workers:
                secs = min(_timed_dsquant(src, root / f"out-{recipe}-{workers}", recipe, workers, args.device)
                           for _ in range(args.repeat))
                gbs = nbytes / 1e9 / secs
                write_s = raw_write(root, out_bytes[recipe])
                row = {**base, "workers": workers, "dsquant_gb_s": round(gbs, 4),
                       "x_naive": round(naive_s / secs, 2) if naive_s else "", "frac_of_read": round(read_s / secs, 3),
                       "frac_of_read_write": round((read_s + write_s) / secs, 3)}
                rows.append(row)
                vs_naive = f"naive {nbytes / 1e6 / naive_s:7.1f} MB/s  ({row['x_naive']:.2f}x)  " if naive_s else ""
                print(f"{recipe:<18} workers={workers}  dsquant {gbs * 1000:7.1f} MB/s  {vs_naive}raw read "
                      f"{nbytes / 1e6 / read_s:7.1f} MB/s ({row['frac_of_read']:.2f}), raw read+write of the "
                      f"output {nbytes / 1e6 / (read_s + write_s):7.1f} MB/s ({row['frac_of_read_write']:.2f})",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def _timed_naive(src: Path, dst: Path, recipe: str, convention: str, device: str) -> float:
    secs = naive(src, dst, recipe, convention, device)
    shutil.rmtree(dst)
    return secs


def _timed_dsquant(src: Path, dst: Path, recipe: str, workers: int, device: str) -> float:
    secs = dsquant_convert(src, dst, recipe, workers, device)
    out_bytes[recipe] = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    shutil.rmtree(dst)
    return secs


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    main()
