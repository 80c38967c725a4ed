"""`dsquant eval` as a library call: text -> windows -> one pass over the model(s) -> metrics.

evaluate(ckpt, base=..., ...) returns the eval_results.json structure:
    {"protocol": {...}, "results": [{"name", "ppl", "delta_ppl_pct", "kld", "top1", "tokens", "kv_cache"}],
     "base": {"name", "ppl", "tokens", "kv_cache"} or None}
The base model always runs with a BF16 latent cache, so --kv-cache fp8 measures the cache's cost too.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from dsquant.demo import context_length
from dsquant.devices import cpu_threads, resolve_devices
from dsquant.progress import Progress
from dsquant.runner.data import read_user_text, shipped_text
from dsquant.runner.family import require
from dsquant.runner.load import ModelCheckpoint, load_model
from dsquant.runner.offload import StreamStats, resident_logits, stream_logits
from dsquant.runner.perplexity import Accumulator, make_windows
from dsquant.runner.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet")
# Window length when the model records none of its own: the usual perplexity protocol, bounded by the context.
DEFAULT_SEQ_LEN = 2048


def load_text(text_file: str | Path | None = None, dataset: str | None = None) -> tuple[str, dict]:
    """The evaluation text and its description: a local file, wikitext-2 (raw test split), or the held-out
    stdlib text shipped with the demo (the default: the same bytes on every machine)."""
    if text_file is not None and dataset is not None:
        raise ValueError("give either --text-file or --dataset, not both")
    if text_file is not None:
        text = read_user_text(text_file, "--text-file")
        return text, {"source": str(text_file), "chars": len(text)}
    if dataset is None:
        return shipped_text("heldout")
    if dataset != "wikitext2":
        raise ValueError(f"--dataset {dataset!r}: only 'wikitext2' is known (or use --text-file)")
    from huggingface_hub import hf_hub_download

    from dsquant.checkpoint.hub_source import hub_errors

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("--dataset wikitext2 reads a parquet file, which needs pyarrow: pip install "
                         "'dsquant[data]' (or pass the text itself with --text-file)") from None
    with hub_errors(f"--dataset wikitext2 ({WIKITEXT2[0]})", WIKITEXT2[0]):
        file = hf_hub_download(WIKITEXT2[0], WIKITEXT2[1], repo_type="dataset")
    text = "".join(pq.read_table(file).column("text").to_pylist())  # lines keep their own "\n"
    return text, {"source": f"{WIKITEXT2[0]} {WIKITEXT2[1]}", "chars": len(text)}


def _name(path) -> str:
    return Path(path).resolve().name


def evaluate(
    ckpt: str | Path | list, *, base: str | Path | None = None, text: str, text_info: dict,
    seq_len: int | None = None, max_tokens: int | None = None, kv_cache: str = "bf16", device: str = "cpu",
    offload: str | None = None, tokenizer: str | Path | None = None, batch_size: int = 4,
    stats: StreamStats | None = None, devices: list[str] | None = None, threads: int | None = None,
    progress: bool = False,
) -> dict:  # fmt: skip
    """Perplexity of ckpt (and KLD / top-1 / delta against base) on `text`; see perplexity.py for the protocol.

    ckpt may be a list: every checkpoint is compared with the same base logits (computed once per batch),
    one result row each. The tokenizer is the first checkpoint's (or --tokenizer). With offload="layer"
    and a base, the base streams first and its logits are kept on the host until the quantized model
    has streamed: tokens x vocab x 4 bytes (4.2 GB for 8192 tokens of DeepSeek-V3's 129280 vocabulary).
    With offload="layer", device="cuda" spreads the windows over every visible GPU (devices= names them
    explicitly); without offload the whole model sits on one device.

    seq_len None: DEFAULT_SEQ_LEN, bounded by the model's context (demo.context_length). threads: torch CPU
    threads (None: devices.default_threads). progress: tokens/s and time left on stderr while the models run.
    """
    with cpu_threads(threads) as n_threads:
        out = _evaluate(ckpt, base, text, text_info, seq_len, max_tokens, kv_cache, device, offload, tokenizer,
                        batch_size, stats, devices, progress)  # fmt: skip
    out["protocol"]["threads"] = n_threads
    return out


def _evaluate(ckpt, base, text, text_info, seq_len, max_tokens, kv_cache, device, offload, tokenizer, batch_size,
              stats, devices, progress) -> dict:  # fmt: skip
    if offload not in (None, "none", "layer"):
        raise ValueError(f"--offload {offload!r}: choose 'layer' (or leave it out)")
    ckpts = list(ckpt) if isinstance(ckpt, (list, tuple)) else [ckpt]
    readers = [ModelCheckpoint(p) for p in ckpts + ([base] if base is not None else [])]  # not a checkpoint: fail
    args = readers[0].args
    for r in readers:
        if offload == "layer":
            require(r.family, "offload", str(r.path))
        if kv_cache != "bf16":
            require(r.family, "kv_cache", str(r.path))
    tok = load_tokenizer(ckpts[0], tokenizer)
    ids = tok.encode(text, add_special_tokens=False).ids
    context, why = context_length(ckpts[0], args)
    seq_len = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, context)
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context, {context} ({why}); "
                         f"use --seq-len {context} or less")  # fmt: skip
    bos = args.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    windows = make_windows(ids, seq_len, max_tokens)
    impl = "triton" if str(device).startswith("cuda") else "reference"
    t0 = time.perf_counter()
    accs = [Accumulator() for _ in ckpts]
    stats = stats if stats is not None else StreamStats()
    bar = Progress("eval", windows.numel() * (len(ckpts) + (base is not None)), enabled=progress)
    if offload == "layer":
        devices = devices or resolve_devices(device)
        base_logits = {}
        if base is not None:
            for i, lg in stream_logits(base, windows, impl=impl, devices=devices, batch_size=batch_size,
                                       progress=bar):  # fmt: skip
                base_logits[i] = lg.cpu()
        for acc, path in zip(accs, ckpts):
            for i, lg in stream_logits(path, windows, impl=impl, devices=devices, kv_cache=kv_cache,
                                       batch_size=batch_size, stats=stats, progress=bar):  # fmt: skip
                acc.add(lg.cpu(), windows[i : i + lg.shape[0]], base_logits.get(i))
    else:
        models = [load_model(p, impl=impl, device=device)[0] for p in ckpts]
        base_model = load_model(base, impl=impl, device=device)[0] if base is not None else None
        runs = [_counted(resident_logits(m, windows, kv_cache=kv_cache, batch_size=batch_size, device=device), bar)
                for m in models]  # fmt: skip
        base_run = (_counted(resident_logits(base_model, windows, batch_size=batch_size, device=device), bar)
                    if base_model else None)  # fmt: skip
        for batches in zip(*runs):
            blg = next(base_run)[1] if base_run is not None else None
            for acc, (i, lg) in zip(accs, batches):
                acc.add(lg, windows[i : i + lg.shape[0]], blg)
    bar.close()
    seconds = time.perf_counter() - t0
    protocol = {
        "metric": "token-level perplexity",
        "windows": int(windows.shape[0]), "seq_len": seq_len, "overlap": 0,
        "scored_per_window": seq_len - 1, "tokens_scored": accs[0].tokens,
        "bos": "one at the start of the stream" if bos is not None else "none",
        "text": text_info, "tokenizer": str(tokenizer or Path(ckpts[0]) / "tokenizer.json"),
        "device": ",".join(devices) if offload == "layer" else str(device),
        "impl": impl, "offload": offload or "none", "seconds": round(seconds, 2),
        "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip
    results = []
    for acc, path in zip(accs, ckpts):
        row = {"name": _name(path), "ppl": acc.ppl, "delta_ppl_pct": None, "kld": None, "top1": None,
               "tokens": acc.tokens, "kv_cache": kv_cache}  # fmt: skip
        if base is not None:
            row.update(acc.comparison())
        results.append(row)
    base_entry = None
    if base is not None:
        base_entry = {"name": _name(base), "ppl": accs[0].base_ppl, "tokens": accs[0].tokens, "kv_cache": "bf16"}
    out = {"protocol": protocol, "results": results, "base": base_entry}
    if offload == "layer":
        out["streaming"] = stats.as_dict()
    return out


def _counted(batches, bar: Progress):
    """Pass (first window, logits) batches through, counting each batch's tokens on `bar`."""
    for i, lg in batches:
        bar.update(lg.shape[0] * lg.shape[1])
        yield i, lg
