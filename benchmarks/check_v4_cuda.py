"""The DeepSeek-V4 runner on CUDA (impl="triton": routing kernel, fused MoE, GEMM kernels, bf16) against its CPU
reference (impl="reference", float32), on every output the converter writes from the bundled V4 demo: the official
mixed source (FP8 + MXFP4 experts), v4-fp8-block, v4-nvfp4, and v4-nvfp4 with input scales calibrated on CUDA.

Per checkpoint: perplexity on the demo's held-out text from both paths, KLD and top-1 agreement of the CUDA logits
against the CPU ones, the fused MoE launches per forward and their format, and greedy generation (KV cache) on both.
Calibration: the CUDA pass's input scales against the CPU pass's on the same text. Prints the GPU, driver, torch
and Triton first; writes JSON to OUT (argument, default ./v4_cuda).

    python3 benchmarks/check_v4_cuda.py OUT
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import dsquant.kernels.moe as moe
import torch
import triton

from dsquant.convert import convert
from dsquant.demo import ASSET_DIR, V4_ASSET_DIR
from dsquant.runner.calibrate import calibrate
from dsquant.runner.generate import generate
from dsquant.runner.load import load_model
from dsquant.runner.perplexity import Accumulator, make_windows
from dsquant.runner.tokenizer import load_tokenizer

SEQ_LEN, MAX_TOKENS, CALIB_TOKENS, NEW_TOKENS = 512, 2048, 2048, 32
PROMPT = "import os\n\ndef main():\n"


def header() -> dict:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime())}  # fmt: skip


def logits_of(model, windows: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(windows[i : i + 4].to(device)).float().cpu() for i in range(0, len(windows), 4)])


def compare(path: Path, windows: torch.Tensor, prompt: list[int]) -> dict:
    """CUDA triton path vs CPU reference on one checkpoint."""
    calls = []
    fused = moe.fused_moe
    moe.fused_moe = lambda *a, **k: calls.append(k["fmt"]) or fused(*a, **k)
    try:
        cuda, reader = load_model(path, impl="triton", device="cuda")
        cpu, _ = load_model(path, impl="reference", device="cpu")
        lg_cuda = logits_of(cuda, windows, "cuda")
        per_forward = len(calls) / -(-len(windows) // 4)
        lg_cpu = logits_of(cpu, windows, "cpu")
        acc, ref = Accumulator(), Accumulator()
        acc.add(lg_cuda, windows, lg_cpu)
        ref.add(lg_cpu, windows)
        g_cuda = generate(cuda, prompt, max_new_tokens=NEW_TOKENS, eos_id=None, device="cuda").token_ids
        g_cpu = generate(cpu, prompt, max_new_tokens=NEW_TOKENS, eos_id=None).token_ids
    finally:
        moe.fused_moe = fused
    same = next((i for i, (a, b) in enumerate(zip(g_cuda, g_cpu)) if a != b), len(g_cpu))
    return {"checkpoint": path.name, "ppl_cuda": acc.ppl, "ppl_cpu": ref.ppl, **acc.comparison(),
            "fused_moe_per_forward": per_forward, "fused_fmt": sorted(set(calls)),
            "generate_same_prefix": same, "generate_tokens": len(g_cpu)}  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "v4_cuda")
    out.mkdir(parents=True, exist_ok=True)
    info = header()
    print(json.dumps(info), flush=True)
    src = V4_ASSET_DIR
    heldout = (ASSET_DIR / "eval" / "heldout.txt").read_text()
    calib_text = (ASSET_DIR / "eval" / "calibration.txt").read_text()
    tok = load_tokenizer(src)
    bos = 256
    windows = make_windows([bos] + tok.encode(heldout, add_special_tokens=False).ids, SEQ_LEN, MAX_TOKENS)
    prompt = [bos] + tok.encode(PROMPT, add_special_tokens=False).ids
    ckpts = {"source": src}
    for recipe in ("v4-fp8-block", "v4-nvfp4"):
        ckpts[recipe] = out / recipe
        convert(str(src), str(out / recipe), recipe, progress=False)
    t0 = time.perf_counter()
    scales_cuda = calibrate(str(src), calib_text, device="cuda", max_tokens=CALIB_TOKENS)
    t_cuda = time.perf_counter() - t0
    scales_cpu = calibrate(str(src), calib_text, device="cpu", max_tokens=CALIB_TOKENS)
    both = [k for k in scales_cuda if k in scales_cpu]
    same = sum(scales_cuda[k] == scales_cpu[k] for k in both)
    calib = {"scales": len(scales_cuda), "cpu_scales": len(scales_cpu), "equal_to_cpu": same,
             "max_ratio": max(max(scales_cuda[k] / scales_cpu[k], scales_cpu[k] / scales_cuda[k])
                              for k in both), "cuda_s": round(t_cuda, 2)}  # fmt: skip
    print(json.dumps({"calibration": calib}), flush=True)
    ckpts["v4-nvfp4-calibrated"] = out / "v4-nvfp4-calibrated"
    convert(str(src), str(ckpts["v4-nvfp4-calibrated"]), "v4-nvfp4", progress=False, calibration=scales_cuda)
    rows = []
    for name, path in ckpts.items():
        row = {"name": name, **compare(Path(path), windows, prompt)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "v4_cuda.json").write_text(json.dumps({**info, "calibration": calib, "rows": rows,
                                                  "windows": list(windows.shape)}, indent=2))  # fmt: skip
    if set(scales_cuda) != set(scales_cpu):  # the CUDA pass must observe every linear the CPU pass does
        sys.exit(f"CUDA calibration set {len(scales_cuda)} input scales, the CPU reference {len(scales_cpu)}")


if __name__ == "__main__":
    main()
