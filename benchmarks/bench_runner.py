"""Runner benchmarks: small-kernel bandwidth, layer-streamed seconds per layer vs read time, demo eval/generate.

    python3 benchmarks/bench_runner.py --out benchmarks/results/runner_h100.csv [--experts 64] [--smoke]

1. rms_norm / fused_add_rms_norm / apply_rope (GB/s of bytes read + written) and top_k_top_p_sample
   (microseconds per row at V = 129280), against a device-to-device copy measured in the same run.
2. Layer streaming on a random FP8 checkpoint with DeepSeek-V3 layer shapes (hidden 7168, 128 heads,
   MLA 1536/512/64, dense MLP 18432, experts 2048 wide; --experts of the 256 per MoE layer to fit the
   time): per layer, bytes, seconds to load them (file read + host-to-device), seconds of compute,
   against the seconds to read the same bytes cold from disk (page cache dropped with fadvise).
3. The demo model on the device: eval (perplexity, FP8 latent cache) and greedy generate tokens/s.
Rows go to the CSV with gpu name, torch and triton versions and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import time
from pathlib import Path

import checkout  # noqa: F401  (first: a checkout runs without install)
import torch


def _env(device: str) -> dict:
    import triton

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"gpu": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}  # fmt: skip


def _bench(fn, device: str) -> float:
    """Median milliseconds."""
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def bench_kernels(device: str, rows: list) -> None:
    from dsquant.kernels.norm.triton import fused_add_rms_norm, rms_norm
    from dsquant.kernels.rope.reference import rope_cache_ref
    from dsquant.kernels.rope.triton import apply_rope
    from dsquant.kernels.sample.triton import top_k_top_p_sample

    m, d = 4096, 7168
    x = torch.randn(m, d, device=device, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.ones(d, device=device, dtype=torch.bfloat16)
    buf = torch.empty_like(x)
    copy_ms = _bench(lambda: buf.copy_(x), device)
    nbytes = 2 * x.numel() * 2
    rows.append({"bench": "copy", "shape": f"{m}x{d} bf16", "ms": copy_ms, "gb_s": nbytes / copy_ms / 1e6})
    for name, fn, nb in (("rms_norm", lambda: rms_norm(x, w), 2 * x.numel() * 2),
                         ("fused_add_rms_norm", lambda: fused_add_rms_norm(x, r, w), 4 * x.numel() * 2)):  # fmt: skip
        ms = _bench(fn, device)
        rows.append({"bench": name, "shape": f"{m}x{d} bf16", "ms": ms, "gb_s": nb / ms / 1e6,
                     "vs_copy": (nb / ms) / (nbytes / copy_ms)})  # fmt: skip
    t, h = 4096, 128
    q = torch.randn(t, h, 192, device=device, dtype=torch.bfloat16)
    k = torch.randn(t, 576, device=device, dtype=torch.bfloat16)
    cos, sin = (c.to(device) for c in rope_cache_ref(64, 8192))
    pos = torch.arange(t, device=device)
    ms = _bench(lambda: apply_rope(q[..., 128:], k[:, 512:], cos, sin, pos), device)
    nb = 2 * (t * h * 64 + t * 64) * 2
    rows.append({"bench": "apply_rope", "shape": f"T{t} H{h} R64 bf16", "ms": ms, "gb_s": nb / ms / 1e6,
                 "vs_copy": (nb / ms) / (nbytes / copy_ms)})  # fmt: skip
    for b in (1, 32):
        probs = torch.softmax(torch.randn(b, 129280, device=device) * 3, dim=-1)
        args = (torch.full((b,), 50, dtype=torch.int32, device=device), torch.full((b,), 0.9, device=device),
                torch.rand(b, device=device))  # fmt: skip
        ms = _bench(lambda: top_k_top_p_sample(probs, *args), device)
        ms_sort = _bench(lambda: torch.sort(probs, dim=-1, descending=True), device)
        rows.append({"bench": "top_k_top_p_sample", "shape": f"B{b} V129280", "ms": ms,
                     "note": f"torch.sort of the same rows {ms_sort:.3f} ms"})  # fmt: skip


def _write_v3_layers(path: Path, experts: int, layers: int, device: str) -> Path:
    """Random FP8 checkpoint with V3 layer shapes, generated and quantized on the device (fast)."""
    from safetensors.torch import save_file

    from dsquant.checkpoint.synth import tensor_specs, variant_config
    from dsquant.formats.fp8 import quantize_fp8_block

    cfg = variant_config("v3")
    cfg.update(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
               num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=experts, num_experts_per_tok=8,
               n_group=8, topk_group=4, num_hidden_layers=layers, first_k_dense_replace=1,
               num_nextn_predict_layers=0, vocab_size=2048, max_position_embeddings=4096)  # fmt: skip
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    quant = quantize_fp8_block
    if device.startswith("cuda"):
        from dsquant.kernels.quant import quantize_fp8_block as quant
    weight_map = {}
    shard: dict = {}
    for name, shape, kind in tensor_specs(cfg):
        lm = name.split(".")
        key = lm[2] if lm[:2] == ["model", "layers"] else "rest"
        if kind == "linear":
            wt = (torch.randn(*shape, device=device) * 0.02).to(torch.bfloat16)
            qw, s = quant(wt)
            shard.setdefault(key, {})[name] = qw.cpu()
            shard[key][name + "_scale_inv"] = s.cpu()
        else:
            t = torch.ones(shape) if "norm" in name else torch.randn(*shape) * 0.02
            shard.setdefault(key, {})[name] = t.float() if "bias" in name else t.to(torch.bfloat16)
    for key, tensors in shard.items():
        file = f"model-{key}.safetensors"
        save_file(tensors, str(path / file))
        weight_map.update({n: file for n in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _drop_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def bench_streaming(device: str, experts: int, layers: int, workdir: Path, rows: list) -> None:
    from dsquant.runner.offload import StreamStats, stream_logits

    t0 = time.perf_counter()
    ckpt = _write_v3_layers(workdir / "v3-layers", experts, layers, device)
    write_s = time.perf_counter() - t0
    _drop_cache(ckpt)
    cold = {}
    for f in ckpt.glob("model-*.safetensors"):  # cold sequential read of each layer's file
        t1 = time.perf_counter()
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
        cold[f.name] = (f.stat().st_size, time.perf_counter() - t1)
    _drop_cache(ckpt)
    windows = torch.randint(0, 2048, (2, 512))
    stats = StreamStats()
    for _ in stream_logits(ckpt, windows, impl="triton" if device.startswith("cuda") else "reference",
                           device=device, kv_cache="fp8", batch_size=2, stats=stats):  # fmt: skip
        pass
    def kind(layer: int) -> str:
        return "dense" if layer == 0 else f"MoE {experts} experts"

    for s in stats.layers:
        size, read_s = cold[f"model-{s['layer']}.safetensors"]
        rows.append({"bench": "stream_layer", "shape": f"layer {s['layer']} ({kind(s['layer'])}), 2x512 tokens",
                     "bytes": s["bytes"], "load_s": s["load_s"], "compute_s": s["compute_s"],
                     "cold_read_s": read_s, "read_gb_s": size / read_s / 1e9,
                     "load_over_read": s["load_s"] / read_s,
                     "note": f"checkpoint written in {write_s:.1f} s"})  # fmt: skip


def bench_demo(device: str, rows: list) -> None:
    from dsquant.demo import ASSET_DIR
    from dsquant.runner.evaluate import evaluate, load_text
    from dsquant.runner.generate import generate
    from dsquant.runner.load import load_model

    text, info = load_text()
    for kv in ("bf16", "fp8"):
        out = evaluate(ASSET_DIR, text=text, text_info=info, seq_len=512, max_tokens=65536, kv_cache=kv,
                       device=device, batch_size=16)  # fmt: skip
        r, p = out["results"][0], out["protocol"]
        rows.append({"bench": "demo_eval", "shape": f"{p['windows']}x512 kv {kv}", "ms": 1e3 * p["seconds"],
                     "note": f"ppl {r['ppl']:.4f} tokens {r['tokens']} "
                             f"({r['tokens'] / p['seconds']:.0f} tok/s)"})  # fmt: skip
    model, _ = load_model(ASSET_DIR, impl="triton" if device.startswith("cuda") else "reference", device=device)
    prompt = [256] + list(b"def main(argv):\n")
    generate(model, prompt, max_new_tokens=4, device=device)
    g = generate(model, prompt, max_new_tokens=128, device=device)
    rows.append({"bench": "demo_generate", "shape": "greedy 128 tokens", "ms": 1e3 * g.decode_s,
                 "note": f"{g.decode_tok_per_s:.1f} tok/s decode, prefill {1e3 * g.prefill_s:.1f} ms"})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dsquant-bench-runner"))
    ap.add_argument("--sections", default="kernels,stream,demo")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = _env(device)
    print(json.dumps(env))
    rows: list = []
    for section in a.sections.split(","):
        t0 = time.perf_counter()
        try:
            {"kernels": lambda: bench_kernels(device, rows),
             "stream": lambda: bench_streaming(device, a.experts, a.layers, a.workdir, rows),
             "demo": lambda: bench_demo(device, rows)}[section]()  # fmt: skip
        except Exception as e:  # one failing section must not lose the others' figures
            rows.append({"bench": section, "note": f"failed: {type(e).__name__}: {e}"[:300]})
        print(f"section {section}: {time.perf_counter() - t0:.1f} s", flush=True)
        _write(a.out, rows, env)
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))


def _write(out: Path, rows: list, env: dict) -> None:
    fields = ["bench", "shape", "ms", "gb_s", "vs_copy", "bytes", "load_s", "compute_s", "cold_read_s", "read_gb_s",
              "load_over_read", "note", "gpu", "torch", "triton", "date"]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **env})


if __name__ == "__main__":
    main()
