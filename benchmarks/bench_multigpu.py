"""Several GPUs of one node: conversion speed with one GPU against all of them, and layer-streamed eval spread
over the GPUs against the one-GPU result.

    python benchmarks/bench_multigpu.py --size-gb 8 --out benchmarks/results/multigpu_h100x2.csv

1. convert: a synthetic BF16 source with DeepSeek-V3 shapes (benchmarks/bench_convert.py builds it) is converted
   with `--device cuda:0` and with `--device cuda` (one worker per visible GPU), page cache dropped before each
   pass; the outputs must be byte-identical. GB/s of source and the speed-up are reported.
2. stream: a random FP8 checkpoint with full V3 layer shapes (bench_runner.py builds it) streams its windows
   through `stream_logits` on cuda:0 and on every GPU; the logits must be equal, window for window.
3. eval: `dsquant.runner.evaluate` with --offload layer on the bundled demo model (NVFP4 against its FP8
   source): perplexity, KLD and top-1 on one GPU and on all, which must be equal.
Rows go to --out with card, GPU count, torch, triton and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
from bench_convert import drop_cache, dsquant_convert, make_source, raw_read
from bench_runner import _write_v3_layers


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def bench_convert(root: Path, size_gb: float, recipes: list[str], gpus: list[str], rows: list) -> None:
    src = make_source(root, size_gb, "bf16")
    nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    read_s = raw_read(src)
    print(f"source {nbytes / 1e9:.2f} GB, raw read {nbytes / 1e9 / read_s:.2f} GB/s", flush=True)
    for recipe in recipes:
        secs, digests = {}, {}
        for device in ("cuda:0", "cuda"):
            dst = root / f"out-{recipe}-{device.replace(':', '')}"
            secs[device] = dsquant_convert(src, dst, recipe, 1, device)
            digests[device] = _digest(dst)
            shutil.rmtree(dst)
        same = digests["cuda:0"] == digests["cuda"]
        for device, s in secs.items():
            n = 1 if device == "cuda:0" else len(gpus)
            rows.append({"bench": "convert", "what": recipe, "gpus": n, "seconds": round(s, 3),
                         "gb_s": round(nbytes / 1e9 / s, 3), "speedup": round(secs["cuda:0"] / s, 3),
                         "read_gb_s": round(nbytes / 1e9 / read_s, 3), "equal": same,
                         "note": f"{nbytes / 1e9:.2f} GB BF16 source"})  # fmt: skip
        print(f"convert {recipe:<10} 1 GPU {nbytes / 1e9 / secs['cuda:0']:.2f} GB/s, {len(gpus)} GPUs "
              f"{nbytes / 1e9 / secs['cuda']:.2f} GB/s ({secs['cuda:0'] / secs['cuda']:.2f}x), "
              f"byte-identical: {same}", flush=True)


def bench_stream(root: Path, experts: int, layers: int, windows_n: int, gpus: list[str], rows: list) -> None:
    from dsquant.runner.offload import StreamStats, stream_logits

    ckpt = _write_v3_layers(root / "v3-layers", experts, layers, "cuda:0")
    windows = torch.randint(0, 2048, (windows_n, 512), generator=torch.Generator().manual_seed(0))
    for _ in stream_logits(ckpt, windows[: 2 * len(gpus)], impl="triton", devices=gpus, kv_cache="fp8",
                           batch_size=2):  # untimed: compiles every kernel on every GPU
        pass
    out = {}
    for devs in (gpus[:1], gpus):
        drop_cache(ckpt)
        stats = StreamStats()
        t0 = time.perf_counter()
        logits = [lg.cpu() for _, lg in stream_logits(ckpt, windows, impl="triton", devices=devs, kv_cache="fp8",
                                                batch_size=2, stats=stats)]  # fmt: skip
        secs = time.perf_counter() - t0
        out[len(devs)] = (torch.cat(logits), secs, stats)
    ref, secs1, _ = out[1]
    for n, (lg, secs, stats) in out.items():
        diff = (lg - ref).abs().max().item()
        compute = sum(s["compute_s"] for s in stats.layers)
        rows.append({"bench": "stream", "what": f"{layers} V3 layers ({experts} experts), {windows_n}x512 tokens",
                     "gpus": n, "seconds": round(secs, 3), "speedup": round(secs1 / secs, 3),
                     "equal": bool(torch.equal(lg, ref)),
                     "note": f"max |diff| {diff:.3g}; compute {compute:.2f} s"})  # fmt: skip
        print(f"stream {n} GPU(s): {secs:.2f} s (compute {compute:.2f} s), equal to 1 GPU: {torch.equal(lg, ref)} "
              f"(max |diff| {diff:.3g})", flush=True)


def bench_eval(root: Path, gpus: list[str], rows: list) -> None:
    from dsquant.convert import convert
    from dsquant.demo import demo_model_dir
    from dsquant.runner.evaluate import evaluate, load_text

    src = demo_model_dir()
    q = root / "demo-nvfp4"
    convert(src, q, "nvfp4", progress=False)
    text, info = load_text()
    evaluate(q, base=src, text=text, text_info=info, seq_len=512, max_tokens=2048 * len(gpus), device="cuda",
             offload="layer", devices=gpus, batch_size=2)  # untimed: compiles every kernel on every GPU
    res = {}
    for devs in (gpus[:1], gpus):
        t0 = time.perf_counter()
        out = evaluate(q, base=src, text=text, text_info=info, seq_len=512, max_tokens=32768, device="cuda",
                       offload="layer", devices=devs, batch_size=8)  # fmt: skip
        res[len(devs)] = (out["results"][0], time.perf_counter() - t0)
    r1 = res[1][0]
    for n, (r, secs) in res.items():
        same = all(r[k] == r1[k] for k in ("ppl", "kld", "top1", "delta_ppl_pct", "tokens"))
        rows.append({"bench": "eval", "what": "demo nvfp4 vs FP8 source, --offload layer, 64x512 tokens",
                     "gpus": n, "seconds": round(secs, 3), "speedup": round(res[1][1] / secs, 3), "equal": same,
                     "note": f"ppl {r['ppl']:.6f} kld {r['kld']:.6g} top1 {r['top1']:.6f}"})  # fmt: skip
        print(f"eval {n} GPU(s): ppl {r['ppl']:.6f} kld {r['kld']:.6g} top1 {r['top1']:.6f}, equal: {same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--recipes", nargs="+", default=["nvfp4", "fp8-block"])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--sections", default="convert,stream,eval")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import triton

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if len(gpus) < 2:
        print(f"warning: {len(gpus)} GPU visible; the 'all GPUs' rows repeat the one-GPU run", flush=True)
    env = {"gpu": torch.cuda.get_device_name(0), "gpu_count": len(gpus), "torch": torch.__version__,
           "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    print(env, flush=True)
    rows: list[dict] = []
    failed: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="bench-multigpu-", dir=a.tmp))
    try:
        sections = {"convert": lambda: bench_convert(root, a.size_gb, a.recipes, gpus, rows),
                    "stream": lambda: bench_stream(root, a.experts, a.layers, a.windows, gpus, rows),
                    "eval": lambda: bench_eval(root, gpus, rows)}  # fmt: skip
        for section in a.sections.split(","):
            try:
                sections[section]()
            except Exception:  # one failed section must not cost the others' figures
                traceback.print_exc()
                failed.append(section)
            _write(a.out, env, rows)  # what finished survives a timeout
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


def _write(path: Path, env: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(env) + ["bench", "what", "gpus", "seconds", "gb_s", "speedup", "read_gb_s", "equal", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({**env, **r} for r in rows)


if __name__ == "__main__":
    main()
