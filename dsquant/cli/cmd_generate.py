"""`dsquant generate CKPT PROMPT`: a thin mapping of options onto dsquant.runner.generate."""

from __future__ import annotations

from pathlib import Path

import typer

from dsquant.cli.app import THREADS, app, fail


@app.command("generate")
def generate_cmd(
    ckpt: str = typer.Argument(..., help="Checkpoint folder (any format dsquant writes or reads)."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most; with the "
                                       "prompt, within the model's context."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; otherwise sample."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = no limit)."),
    kv_cache: str = typer.Option("bf16", "--kv-cache", help="Latent KV cache: bf16, fp8 or fp8_ds."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="tokenizer.json when the checkpoint has none."),
    stats: bool = typer.Option(False, "--stats", help="Print prefill time and decode tokens/s to stderr."),
    threads: int = THREADS,
) -> None:
    """Generate text with the bundled runner, through the paged latent cache (MLA decode kernel on CUDA).
    Progress (tokens/s, time left) goes to stderr, the text to stdout.

    Example:

    \b
      dsquant generate ./demo-nvfp4 "def fibonacci(n):" -n 80
    """
    from dsquant.checkpoint.manifest import unfinished_conversion
    from dsquant.demo import context_length
    from dsquant.devices import cpu_threads
    from dsquant.runner.generate import generate
    from dsquant.runner.load import load_model
    from dsquant.runner.tokenizer import load_tokenizer

    if not Path(ckpt).is_dir():
        fail(f"CKPT {ckpt}: no such checkpoint directory")
    if unfinished := unfinished_conversion(ckpt):
        fail(unfinished)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {device}: CUDA is not available on this machine")
    try:
        with cpu_threads(threads):
            tok = load_tokenizer(ckpt, tokenizer)
            model, reader = load_model(ckpt, impl="triton" if device.startswith("cuda") else "reference",
                                       device=device)  # fmt: skip
            ids = tok.encode(prompt, add_special_tokens=False).ids
            if reader.args.bos_token_id is not None:
                ids = [reader.args.bos_token_id] + ids
            g = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, kv_cache=kv_cache, eos_id=reader.args.eos_token_id, seed=seed, device=device,
                         context=context_length(ckpt, reader.args), progress=True)  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    typer.echo(prompt + tok.decode(g.token_ids, skip_special_tokens=True))
    if stats:
        typer.echo(f"prompt {g.prompt_tokens} tokens, prefill {g.prefill_s * 1e3:.1f} ms; {len(g.token_ids)} new "
                   f"tokens, decode {g.decode_tok_per_s:.1f} tokens/s", err=True)  # fmt: skip
