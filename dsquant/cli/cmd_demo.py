"""`dsquant demo`: convert the bundled demo model with every shipped recipe and evaluate each against it."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import typer

from dsquant.cli.app import app, fail


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


CALIBRATION_TOKENS = 8192


def run_demo(out_dir: Path, recipes: list[str], *, seq_len: int, max_tokens: int, device: str,
             calibrate: bool = True) -> dict:  # fmt: skip
    """Convert the demo model with each recipe into out_dir/<recipe>, then one eval pass over all of them.

    With calibrate, NVFP4 recipes are also converted with activation scales calibrated on the stdlib
    *train* split (rows "<recipe>+calib"), so the table shows calibrated against the default scales.
    """
    from dsquant.convert import convert
    from dsquant.demo import demo_model_dir
    from dsquant.runner.calibrate import calibrate as run_calibration
    from dsquant.runner.data import stdlib_text
    from dsquant.runner.evaluate import evaluate, load_text

    src = demo_model_dir()
    dsts, names, scales = [], [], None
    for recipe in recipes:
        variants = [(recipe, None)]
        if calibrate and recipe.startswith("nvfp4"):
            if scales is None:
                train_text, _ = stdlib_text("train")
                scales = run_calibration(src, train_text[: 8 * CALIBRATION_TOKENS], seq_len=512,
                                         max_tokens=CALIBRATION_TOKENS, device=device)  # fmt: skip
            variants.append((f"{recipe}+calib", scales))
        for name, cal in variants:
            convert(src, out_dir / name, recipe, device=device, progress=False, calibration=cal)
            dsts.append(out_dir / name)
            names.append(name)
    text, info = load_text()
    out = evaluate(dsts, base=src, text=text, text_info=info, seq_len=seq_len, max_tokens=max_tokens,
                   device=device)  # fmt: skip
    for row, name, dst in zip(out["results"], names, dsts):
        row.update(name=name, bytes=_size(dst))
    out["base"].update(name="source (fp8, DeepSeek native)", bytes=_size(Path(src)))
    return out


def print_demo_table(out: dict) -> None:
    typer.echo(f"{'recipe':<30} {'size':>8} {'ppl':>8} {'delta':>8} {'KLD':>9} {'top-1':>7}")
    b = out["base"]
    typer.echo(f"{b['name']:<30} {b['bytes'] / 1e6:>6.2f}MB {b['ppl']:>8.4f} {'-':>8} {'-':>9} {'-':>7}")
    for r in out["results"]:
        typer.echo(f"{r['name']:<30} {r['bytes'] / 1e6:>6.2f}MB {r['ppl']:>8.4f} {r['delta_ppl_pct']:>+7.2f}% "
                   f"{r['kld']:>9.5f} {100 * r['top1']:>6.2f}%")  # fmt: skip


@app.command("demo")
def demo(
    out: Path = typer.Option(None, "--out", help="Keep the converted checkpoints here (default: a temporary folder)."),
    recipe: list[str] = typer.Option(None, "--recipe", "-r", help="Recipes to run (repeatable; default: all shipped)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per evaluation window."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Evaluation tokens (held-out stdlib source)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Also convert NVFP4 recipes with "
                                   "activation scales calibrated on the stdlib train split."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Convert the bundled demo model (a small DeepSeek-V3 trained on the Python stdlib source, shipped in FP8)
    with every shipped recipe, evaluate each against the source, and print one table: recipe, size,
    perplexity, delta perplexity, KL divergence and top-1 agreement."""
    from dsquant.recipe_files import shipped_recipes

    names = recipe or [name for name, _ in shipped_recipes()]
    logging.getLogger("dsquant.model_card").setLevel(logging.ERROR)  # the demo has no Hub id to cite
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if any(out.iterdir()):
                fail(f"--out {out}: folder is not empty")
            result = run_demo(out, names, seq_len=seq_len, max_tokens=max_tokens, device=device, calibrate=calibrate)
        else:
            with tempfile.TemporaryDirectory(prefix="dsquant-demo-") as tmp:
                result = run_demo(Path(tmp), names, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                  calibrate=calibrate)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    p = result["protocol"]
    typer.echo(f"demo: {p['tokens_scored']} tokens of {p['text']['source']} ({p['windows']} windows x "
               f"{p['seq_len']}), each recipe against the FP8 source, {p['impl']} on {p['device']}")  # fmt: skip
    print_demo_table(result)
