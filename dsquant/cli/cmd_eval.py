"""`dsquant eval CKPT [--base CKPT] ...`: a thin mapping of options onto dsquant.runner.evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsquant.cli.app import THREADS, app, fail


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], base: dict | None) -> None:
    """One line per model: name, kv cache, tokens, perplexity, delta, KLD, top-1."""
    typer.echo(f"{'model':<28} {'kv':<5} {'tokens':>8} {'ppl':>9} {'delta':>8} {'KLD':>9} {'top-1':>7}")
    if base is not None:
        typer.echo(f"{base['name'][:28]:<28} {base['kv_cache']:<5} {base['tokens']:>8} {base['ppl']:>9.4f} "
                   f"{'base':>8} {'-':>9} {'-':>7}")  # fmt: skip
    for r in rows:
        delta = "-" if r.get("delta_ppl_pct") is None else f"{r['delta_ppl_pct']:+.2f}%"
        top1 = "-" if r.get("top1") is None else f"{100 * r['top1']:.2f}%"
        typer.echo(f"{r['name'][:28]:<28} {r['kv_cache']:<5} {r['tokens']:>8} {r['ppl']:>9.4f} {delta:>8} "
                   f"{_fmt(r.get('kld'), '.5f'):>9} {top1:>7}")  # fmt: skip


def print_protocol(p: dict) -> None:
    text = p["text"]
    typer.echo(
        f"protocol: {p['metric']}, {p['windows']} non-overlapping windows x {p['seq_len']} tokens "
        f"({p['scored_per_window']} scored each, {p['tokens_scored']} in all), BOS {p['bos']}; "
        f"text {text.get('source')}" + (f" ({text['files']} files)" if "files" in text else "")
        + f"; {p['impl']} on {p['device']}" + (f" ({p['threads']} CPU threads)" if "threads" in p else "")
        + f", offload {p['offload']}, {p['seconds']} s"
    )


@app.command("eval")
def eval_cmd(
    ckpt: str = typer.Argument(None, help="Checkpoint folder to evaluate. Omitted: the bundled demo model."),
    base: str = typer.Option(None, "--base", help="Reference checkpoint (e.g. the source): adds KLD, top-1 "
                                                   "agreement and delta perplexity, from one pass over both."),
    text_file: Path = typer.Option(None, "--text-file", help="UTF-8 text to evaluate on."),
    dataset: str = typer.Option(None, "--dataset", help="wikitext2: the raw test split, fetched from the Hub."),
    seq_len: int = typer.Option(None, "--seq-len", show_default=False,
                                help="Tokens per non-overlapping window [default: the model's own: the context the "
                                     "demo trained at (512), else 2048 bounded by max_position_embeddings]."),
    max_tokens: int = typer.Option(None, "--max-tokens", show_default=False,
                                   help="Use at most this many tokens of the text [default: the demo's 8192 for the "
                                        "demo and its conversions, else all of it]."),
    kv_cache: str = typer.Option("bf16", "--kv-cache", help="Latent KV cache of the evaluated model: bf16, fp8 "
                                                            "(per-tensor scale) or fp8_ds (per-token groups of 128, "
                                                            "FlashMLA's layout); the base always uses bf16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N. With --offload layer, "
                                                 "cuda spreads the windows over every visible GPU."),
    offload: str = typer.Option(None, "--offload", help="layer: stream one decoder layer at a time (one layer "
                                                        "of weights resident)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="tokenizer.json (or a folder with one) when the "
                                                            "checkpoint has none."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    save: bool = typer.Option(False, "--save", help="Write eval_results.json into CKPT (for the model card)."),
    threads: int = THREADS,
) -> None:
    """Measure perplexity (and, with --base, KL divergence and top-1 agreement) of a checkpoint with the bundled
    runner. Default text: held-out Python stdlib files shipped with dsquant (the demo's evaluation text, the same
    on every machine). Progress (tokens/s, time left) goes to stderr.

    Examples:

    \b
      dsquant eval
      dsquant eval ./V3-nvfp4 --base ./DeepSeek-V3 --text-file wiki.test.raw --offload layer --device cuda
    """
    from dsquant.checkpoint.manifest import unfinished_conversion
    from dsquant.demo import demo_model_dir, demo_settings
    from dsquant.runner.evaluate import evaluate, load_text

    ckpt = ckpt or str(demo_model_dir())
    if max_tokens is None and Path(ckpt).is_dir():
        max_tokens = demo_settings(ckpt).get("eval_tokens")
    for what, path in (("CKPT", ckpt), ("--base", base)):
        if path is not None and not Path(path).is_dir():
            fail(f"{what} {path}: no such checkpoint directory")
        if path is not None and (unfinished := unfinished_conversion(path)):
            fail(unfinished)
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be positive, got {max_tokens}")
    if batch_size < 1:
        fail(f"--batch-size must be positive, got {batch_size}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {device}: CUDA is not available on this machine")
    try:
        text, info = load_text(text_file, dataset)
        out = evaluate(ckpt, base=base, text=text, text_info=info, seq_len=seq_len, max_tokens=max_tokens,
                       kv_cache=kv_cache, device=device, offload=offload, tokenizer=tokenizer,
                       batch_size=batch_size, threads=threads, progress=not as_json)  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    if save:
        (Path(ckpt) / "eval_results.json").write_text(json.dumps(out, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    print_protocol(out["protocol"])
    print_table(out["results"], out["base"])
