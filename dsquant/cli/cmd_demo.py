"""`dsquant demo`: convert the bundled demo model with every shipped recipe and evaluate each against it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from dsquant.cli.app import THREADS, app, fail


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


CALIBRATION_TOKENS = 8192


def demo_recipes() -> list[str]:
    """The shipped recipes that apply to the demo model: those for the DeepSeek-V3 layout (the v4-* recipes write
    DeepSeek-V4's official layout and refuse other sources)."""
    from dsquant.convert_v4 import V4_CONVENTION
    from dsquant.recipe import load_recipe
    from dsquant.recipe_files import shipped_recipes

    return [name for name, _ in shipped_recipes() if V4_CONVENTION not in load_recipe(name).conventions]


def run_demo(out_dir: Path, recipes: list[str], *, seq_len: int | None = None, max_tokens: int | None = None,
             device: str = "cpu", calibrate: bool = True, threads: int | None = None,
             progress: bool = False) -> dict:  # fmt: skip
    """Convert the demo model with each recipe into out_dir/<recipe>, then one eval pass over all of them.

    With calibrate, NVFP4 recipes are also converted with activation scales calibrated on the calibration text
    shipped with the demo (a slice of its training split; rows "<recipe>+calib"), so the table shows calibrated
    against the default scales. seq_len / max_tokens None: the demo's own settings (dsquant_demo.json).
    """
    from dsquant.convert import convert
    from dsquant.demo import demo_model_dir, demo_settings
    from dsquant.devices import cpu_threads
    from dsquant.progress import Progress
    from dsquant.runner.calibrate import calibrate as run_calibration
    from dsquant.runner.data import shipped_text
    from dsquant.runner.evaluate import evaluate, load_text

    src = demo_model_dir()
    settings = demo_settings(src)
    seq_len = seq_len or settings.get("context_length")
    max_tokens = max_tokens or settings.get("eval_tokens")
    nvfp4 = calibrate and any(r.startswith("nvfp4") for r in recipes)
    jobs = [(r, False) for r in recipes] + [(r, True) for r in recipes if calibrate and r.startswith("nvfp4")]
    dsts, names, scales = [], [], None
    with cpu_threads(threads) as n_threads:
        if nvfp4:
            scales = run_calibration(src, shipped_text("calibration")[0], seq_len=seq_len or 512,
                                     max_tokens=CALIBRATION_TOKENS, device=device, progress=progress)  # fmt: skip
        with Progress("demo: convert", len(jobs), unit="checkpoints", enabled=progress) as bar:
            for recipe, calibrated in sorted(jobs, key=lambda j: (recipes.index(j[0]), j[1])):
                name = f"{recipe}+calib" if calibrated else recipe
                convert(src, out_dir / name, recipe, device=device, progress=False,
                        calibration=scales if calibrated else None)  # fmt: skip
                dsts.append(out_dir / name)
                names.append(name)
                bar.update()
        text, info = load_text()
        out = evaluate(dsts, base=src, text=text, text_info=info, seq_len=seq_len, max_tokens=max_tokens,
                       device=device, threads=n_threads, progress=progress)  # fmt: skip
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
    out: Path = typer.Option(None, "--out", show_default=False,
                             help="Keep the converted checkpoints here, one folder per row (DIR/<recipe>) "
                                  "[default: a temporary folder]."),
    recipe: list[str] = typer.Option(None, "--recipe", "-r", show_default=False,
                                     help="Recipes to run (repeatable) [default: every shipped recipe]."),
    seq_len: int = typer.Option(None, "--seq-len", show_default=False,
                                help="Tokens per evaluation window [default: the demo's context, 512]."),
    max_tokens: int = typer.Option(None, "--max-tokens", show_default=False,
                                   help="Evaluation tokens of the shipped held-out text [default: 8192]."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Also convert NVFP4 recipes with "
                                   "activation scales calibrated on the calibration text shipped with the demo."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    threads: int = THREADS,
) -> None:
    """Convert the bundled demo model (a small DeepSeek-V3 trained on the Python stdlib source, shipped in FP8)
    with every shipped recipe, evaluate each against the source on the held-out text shipped with it, and print
    one table: recipe, size, perplexity, delta perplexity, KL divergence and top-1 agreement. Progress goes to
    stderr.

    Examples:

    \b
      dsquant demo
      dsquant demo --recipe nvfp4 --no-calibrate --out ./demo-out   (keeps ./demo-out/nvfp4)
    """
    names = recipe or demo_recipes()
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if any(out.iterdir()):
                fail(f"--out {out}: folder is not empty")
            result = run_demo(out, names, seq_len=seq_len, max_tokens=max_tokens, device=device, calibrate=calibrate,
                              threads=threads, progress=not as_json)  # fmt: skip
        else:
            with tempfile.TemporaryDirectory(prefix="dsquant-demo-") as tmp:
                result = run_demo(Path(tmp), names, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                  calibrate=calibrate, threads=threads, progress=not as_json)  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    p = result["protocol"]
    typer.echo(f"demo: {p['tokens_scored']} tokens of {p['text']['source']} ({p['windows']} windows x "
               f"{p['seq_len']}), each recipe against the FP8 source, {p['impl']} on {p['device']}")  # fmt: skip
    print_demo_table(result)
