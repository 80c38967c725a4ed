"""Calibration on the bundled demo model: NVFP4 activation scales (uncalibrated, amax, quarter-octave best fit,
power-of-two search) and the FP8 KV-cache scale (1.0 against a calibrated amax/448), each evaluated against the
FP8 source on the held-out stdlib split.

    python benchmarks/bench_calibration.py --out benchmarks/results/runner_demo_calibration.csv

Calibration text: 8,192 tokens of the stdlib train split. Evaluation: 16 x 512 held-out tokens, CPU reference
numerics (the same protocol as `dsquant demo`). The KV rows store the scales as `self_attn.k_scale` in an extra
shard of a copy of the checkpoint, which is how the runner reads a stored scale.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsquant.convert import convert
from dsquant.demo import demo_model_dir
from dsquant.runner.calibrate import calibrate_all, calibration_windows, finish, record
from dsquant.runner.data import stdlib_text
from dsquant.runner.evaluate import evaluate, load_text

MSE = "mse (default: power of two; largest within 2%)"
QUARTER = "mse-quarter-octave argmin (amax/2688*2^(k/4) k=-8..4)"
FIELDS = ["recipe", "activation_scales", "kv_cache", "kv_scale", "ppl", "delta_ppl_pct", "kld", "top1_pct",
          "tokens", "mlp_linears_calibrated", "protocol", "host", "torch", "date"]  # fmt: skip


def calibrations(src: Path) -> dict:
    text = stdlib_text("train")[0][: 8 * 8192]
    cals = {m: calibrate_all(src, text, seq_len=512, max_tokens=8192, method=m) for m in ("amax", "mse")}
    windows = calibration_windows(src, text, seq_len=512, max_tokens=8192)
    cals["quarter"] = finish(src, record(src, windows, method="mse", tol=0.0, grid="quarter"))
    return cals


def with_kv_scales(ckpt: Path, dst: Path, scales: dict[int, float]) -> Path:
    """A copy of ckpt with one float32 `model.layers.L.self_attn.k_scale` per layer in an extra shard."""
    shutil.copytree(ckpt, dst)
    idx = dst / "model.safetensors.index.json"
    if idx.is_file():
        index = json.loads(idx.read_text())
    else:
        with safe_open(dst / "model.safetensors", "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    t = {f"model.layers.{layer}.self_attn.k_scale": torch.tensor(v, dtype=torch.float32) for layer, v in scales.items()}
    save_file(t, dst / "kv-scales.safetensors")
    index["weight_map"].update({k: "kv-scales.safetensors" for k in t})
    idx.write_text(json.dumps(index))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runner_demo_calibration.csv"))
    a = ap.parse_args()
    logging.getLogger("dsquant.model_card").setLevel(logging.ERROR)
    src = demo_model_dir()
    cals = calibrations(src)
    text, info = load_text()

    def ev(paths: list[Path], kv: str = "bf16") -> dict:
        return evaluate(paths, base=src, text=text, text_info=info, seq_len=512, max_tokens=8192, kv_cache=kv)

    rows: list[list] = []
    work = Path(tempfile.mkdtemp(prefix="bench-calibration-"))
    try:
        paths, labels = [], []
        for recipe in ("nvfp4", "nvfp4-experts-only"):
            for label, cal in (("uncalibrated (input_scale 1.0)", None), ("amax", cals["amax"]),
                               (QUARTER, cals["quarter"]), (MSE, cals["mse"])):  # fmt: skip
                dst = work / f"{recipe}-{label.split()[0]}"
                convert(src, dst, recipe, progress=False, calibration=None if cal is None else cal.input_scales)
                moved = "" if cal is None else sum(1 for k in cal.input_scales if ".mlp." in k)
                paths.append(dst)
                labels.append((recipe, label, moved))
        res = ev(paths)
        for (recipe, label, moved), r in zip(labels, res["results"]):
            rows.append([recipe, label, "bf16", "", r, moved])
        # FP8 latent cache: scale 1.0 (nothing stored) against the unclamped calibrated amax / 448
        raw = cals["mse"].kv_scales(False)
        raw_text = "amax/448 unclamped " + ";".join(f"{v:.5f}" for v in raw.values())
        nv = work / "nvfp4-mse"
        kv_runs = [(src, "source (fp8-block)", "-", "1.0 (none stored)"),
                   (with_kv_scales(src, work / "src-kv", raw), "source (fp8-block)", "-", raw_text),
                   (nv, "nvfp4", MSE, "1.0 (none stored)"),
                   (with_kv_scales(nv, work / "nvfp4-kv", raw), "nvfp4", MSE, raw_text)]  # fmt: skip
        res_kv = ev([p for p, *_ in kv_runs], kv="fp8")
        for (_, recipe, label, kv_text), r in zip(kv_runs, res_kv["results"]):
            rows.append([recipe, label, "fp8", kv_text, r, ""])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    proto = (f"held-out {res['protocol']['text']['source']}, {res['protocol']['windows']} windows x 512, BOS once, "
             "vs the FP8 source; calibration: 8192 stdlib train-split tokens")  # fmt: skip
    meta = [proto, platform.node(), torch.__version__, datetime.date.today().isoformat()]
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for recipe, label, kv, kv_text, r, moved in rows:
            w.writerow([recipe, label, kv, kv_text, f"{r['ppl']:.4f}", f"{r['delta_ppl_pct']:+.2f}", f"{r['kld']:.5f}",
                        f"{100 * r['top1']:.2f}", r["tokens"], moved] + meta)  # fmt: skip
    print(a.out.read_text())


if __name__ == "__main__":
    main()
