"""Train the bundled demo models and export them in DeepSeek's release formats (V3: FP8 blocks; V4: FP8 + MXFP4).

The demo model is the DeepSeek-V3 architecture at a few MB: MLA (q/kv LoRA, decoupled RoPE with V3's
YaRN scaling), one dense layer then MoE layers (8 routed experts in 4 groups, top-2 from the best 2
groups, one shared expert, sigmoid scores with the aux-loss-free bias), and one MTP layer; byte-level
vocabulary. It trains on the Python standard library's source (dsquant.runner.data, train split).
`--family v4` trains the DeepSeek-V4 demo instead (dsquant.runner.v4.demo_model) on the same text, and
export stores it in the V4 release's mixed layout (FP8 + E8M0 grids, MXFP4 experts; no MTP block).

    python -m dsquant.runner.demo_train train --out OUT [--family v4] [--steps N] [--max-seconds S] [--device cuda]
    python -m dsquant.runner.demo_train export --src OUT --dst dsquant/assets/demo

Deterministic data order and initialisation (seed 0). The step count is fixed before the first
update: --steps, or fewer when the measured step time says --max-seconds would be exceeded; the
schedule (warmup, cosine decay) follows that count and the log records it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dsquant.checkpoint.names_v4 import is_v4
from dsquant.formats.fp8 import quantize_fp8_block
from dsquant.runner.config import ModelArgs
from dsquant.runner.linear import QuantLinear
from dsquant.runner.model import MoE, Transformer, Weighted
from dsquant.runner.tokenizer import build_byte_tokenizer
from dsquant.runner.v4 import demo_model as v4_demo
from dsquant.runner.v4.model import Transformer as V4Transformer

log = logging.getLogger("dsquant.demo_train")

BOS_ID, EOS_ID = 256, 257
DEMO_ARGS = ModelArgs(
    vocab_size=258, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=4,
    n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
    score_func="sigmoid", topk_method="noaux_tc", route_scale=1.5, norm_topk_prob=True, q_lora_rank=128,
    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    max_position_embeddings=163840, n_mtp_layers=1, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
)  # fmt: skip
# Not quantized in DeepSeek's FP8 release (formats.md 2.2): embeddings, heads, norms, router, MTP helpers.
_FP8_EXCLUDED = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "eh_proj", "shared_head")


def init_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """The runner model with float32 trainable weights (N(0, 0.02), norms 1, router bias 0)."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args, impl="reference", dtype=torch.float32, mtp=True)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            mod.init_trainable(0.02, g)
        elif isinstance(mod, Weighted):
            if name.endswith("norm") or name.endswith("layernorm"):
                mod.weight = torch.nn.Parameter(torch.ones(*mod.shape))
            else:
                mod.weight = torch.nn.Parameter(torch.randn(*mod.shape, generator=g) * 0.02)
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias = torch.zeros(args.n_routed_experts)
    return model


def byte_stream(split: str) -> torch.Tensor:
    """The split's files as one int64 token stream: <|bos|> then the file's UTF-8 bytes, per file."""
    from dsquant.runner.data import stdlib_files

    parts = []
    for p in stdlib_files(split):
        raw = p.read_bytes()
        if raw:  # empty __init__.py files add nothing
            parts += [torch.tensor([BOS_ID]), torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]
    return torch.cat(parts)


def _loss(model: Transformer, batch: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE, plus the MTP layer's CE on the token after next (DeepSeek-V3's lambda = 0.3 early on);
    the V4 demo has no MTP block."""
    x, y = batch[:, :-1], batch[:, 1:]
    if isinstance(model, V4Transformer):
        main = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        return main, main
    logits, h = model(x, return_hidden=True)
    main = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    mtp = model.mtp_logits(h[:, :-1], y[:, :-1])  # position i sees h_i and token i+1, predicts i+2
    extra = F.cross_entropy(mtp.flatten(0, 1), y[:, 1:].flatten())
    return main + mtp_weight * extra, main


def _update_router_bias(model: Transformer, rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
    for mod in model.modules():
        bias = getattr(getattr(mod, "gate", None), "e_score_correction_bias" if isinstance(mod, MoE) else "bias", None)
        if bias is not None and mod.last_counts is not None:  # V4 hash layers route by token id: no bias
            load = mod.last_counts.float()
            bias += rate * torch.sign(load.mean() - load)


def train(out: Path, *, steps: int, max_seconds: float, device: str, batch: int, seq_len: int, seed: int = 0,
          family: str = "v3") -> dict:
    torch.manual_seed(seed)
    model = (v4_demo.trainable_model(seed=seed) if family == "v4" else init_model(DEMO_ARGS, seed)).to(device)
    data = byte_stream("train")
    heldout = byte_stream("heldout")
    log.info("train tokens %d, held-out tokens %d, params %d", data.numel(), heldout.numel(),
             sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    t0, step, planned, warmup = time.time(), 0, steps, 50
    while step < planned:
        if step == 10:
            t10 = time.time()
        if step == 30:  # fix the step count from the measured rate (after warm-up), then never change it
            rate = (time.time() - t10) / 20
            planned = min(steps, 31 + max(0, int((max_seconds - (time.time() - t0)) / rate)))
            log.info("%.3f s/step: training %d steps", rate, planned)
        lr = 3e-3 * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(planned, 1), 1.0)))
        for group in opt.param_groups:
            group["lr"] = max(lr, 3e-5)
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
        b = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).to(device)
        with amp:
            loss, main = _loss(model, b, 0.3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            _update_router_bias(model, 1e-3)
        if step % 100 == 0:
            log.info("step %d loss %.4f (main %.4f) %.0fs", step, loss.item(), main.item(), time.time() - t0)
        step += 1
    result = {"steps": step, "seconds": round(time.time() - t0, 1), "batch": batch, "seq_len": seq_len,
              "train_tokens_seen": step * batch * seq_len,
              "heldout_nats_per_byte": _heldout_nll(model, heldout, seq_len, device)}  # fmt: skip
    log.info("done: %s", result)
    (save_v4 if family == "v4" else save_bf16)(model, out)
    (out / "train_log.json").write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def _heldout_nll(model: Transformer, heldout: torch.Tensor, seq_len: int, device: str, windows: int = 64) -> float:
    n = min(windows, heldout.numel() // seq_len)
    x = heldout[: n * seq_len].view(n, seq_len).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).item()


def save_bf16(model: Transformer, out: Path) -> None:
    """HF-named BF16 safetensors (router bias float32) plus config.json."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v.detach().float().cpu() if k.endswith("e_score_correction_bias") else v.detach().bfloat16().cpu()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(DEMO_ARGS.to_config(), indent=1))


def save_v4(model: V4Transformer, out: Path) -> None:
    """The trained V4 demo as float32 safetensors under the official names, plus its config.json (no quantization)."""
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in v4_demo.DEMO_V4_CONFIG.items() if k != "quantization_config"}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))


def export(src: Path, dst: Path) -> None:
    """A trained demo (save_bf16 or save_v4) -> its release format in dst, with tokenizer and generation config."""
    config = json.loads((src / "config.json").read_text())
    if is_v4(config):
        dst.mkdir(parents=True, exist_ok=True)
        config = {**config, "quantization_config": v4_demo.DEMO_V4_CONFIG["quantization_config"]}
        tensors = v4_demo.official_tensors(load_file(str(src / "model.safetensors")), config)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        _side_files(src, dst)
    else:
        export_fp8(src, dst)


def export_fp8(src: Path, dst: Path) -> None:
    """BF16 demo checkpoint -> DeepSeek native FP8-block checkpoint with tokenizer and generation config."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in sorted(sd.items()):
        if t.dim() == 2 and not any(x in name for x in _FP8_EXCLUDED):
            q, scale = quantize_fp8_block(t, name=name)
            out[name], out[f"{name}_scale_inv"] = q, scale
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    _side_files(src, dst)


def _side_files(src: Path, dst: Path) -> None:
    """The byte tokenizer, tokenizer and generation configs, and the training log beside a demo's weights."""
    build_byte_tokenizer().save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True, "model_max_length": 4096},
        indent=1) + "\n")
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": True, "temperature": 0.7, "top_p": 0.95},
        indent=1) + "\n")  # fmt: skip
    if (src / "train_log.json").is_file():
        (dst / "train_log.json").write_text((src / "train_log.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dsquant.runner.demo_train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--max-seconds", type=float, default=160.0)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--family", choices=("v3", "v4"), default="v3")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    e = sub.add_parser("export")
    e.add_argument("--src", type=Path, required=True)
    e.add_argument("--dst", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.cmd == "train":
        if a.threads:
            torch.set_num_threads(a.threads)
        train(a.out, steps=a.steps, max_seconds=a.max_seconds, device=a.device, batch=a.batch, seq_len=a.seq_len,
              family=a.family)
    else:
        export(a.src, a.dst)


if __name__ == "__main__":
    main()
