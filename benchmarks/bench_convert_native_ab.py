"""CPU convert with the C extension's loops against the torch quantizers, in one process on one source: each
recipe is converted alternately through both paths (the torch path by making native.available() False), and each
figure is the fastest of --repeat, so both paths see the same host load.

    python benchmarks/bench_convert_native_ab.py --size-gb 1 --out benchmarks/results/convert_cpu_ab.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import tempfile
from pathlib import Path

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
from bench_convert import dsquant_convert, make_source

from dsquant.convert import native

FIELDS = ["host", "cores", "torch", "date", "source", "source_gb", "workers", "method", "recipe",
          "c_loops_mb_s", "torch_mb_s", "torch_over_c"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--recipes", nargs="+", default=["fp8-block", "int8", "nvfp4", "mxfp4"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--host", default="vm")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    assert native.available(), "the C extension dsquant.convert._native is not built (pip install -e .)"
    built = native.available
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ")
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp), args.size_gb, "bf16")
        nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        rows = []
        for recipe in args.recipes:
            best = {"c": float("inf"), "torch": float("inf")}
            for _ in range(args.repeat):
                for path in best:
                    native.available = built if path == "c" else (lambda: False)
                    dst = Path(tmp) / "out"
                    best[path] = min(best[path], dsquant_convert(src, dst, recipe, workers=1))
                    shutil.rmtree(dst)
            native.available = built
            c_mb_s, t_mb_s = nbytes / best["c"] / 1e6, nbytes / best["torch"] / 1e6
            rows.append({"host": args.host, "cores": os.cpu_count(), "torch": torch.__version__, "date": date,
                         "source": "bf16", "source_gb": round(nbytes / 1e9, 2), "workers": 1,
                         "method": "same-process A/B interleaved fastest of 3 (C extension vs torch)",
                         "recipe": recipe, "c_loops_mb_s": round(c_mb_s, 1), "torch_mb_s": round(t_mb_s, 1),
                         "torch_over_c": round(t_mb_s / c_mb_s, 2)})
            print(rows[-1], flush=True)
    if args.out:
        with args.out.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerows(rows)


if __name__ == "__main__":
    main()
