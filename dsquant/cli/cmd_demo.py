"""`dsquant demo`: convert the bundled demo models (DeepSeek-V3 and DeepSeek-V4) with every recipe that applies
to each and evaluate each conversion against its source: one table per family."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from dsquant.checkpoint.names import V3, V4
from dsquant.cli.app import THREADS, app, fail


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


CALIBRATION_TOKENS = 8192
# How each demo source is stored (the table's first row).
SOURCE_NAMES = {V3: "source (fp8, DeepSeek native)", V4: "source (fp8 + mxfp4 experts, V4 release)"}
# Shipped DeepSeek-V4 recipes with nothing to show on the V4 demo, and why (printed under its table).
V4_NOT_APPLICABLE = {
    "v4-mxfp4": "the demo ships MXFP4 experts already (the instruct layout); v4-mxfp4 converts -Base sources, "
                "whose experts are FP8, and on this source writes the source's own bytes",
    "v4-official-names": "restores the official names of a checkpoint transformers saved; the demo has them",
}


def demo_recipes(requested: list[str] | None) -> dict[str, list[str]]:
    """{family: recipes for its table}: the requested recipes split by the family they convert (DeepSeek-V4
    recipes carry the deepseek-v4 convention), or every shipped recipe that applies."""
    from dsquant.convert.v4 import V4_CONVENTION
    from dsquant.recipe import load_recipe
    from dsquant.recipe_files import shipped_recipes

    names = requested or [n for n, _ in shipped_recipes() if n not in V4_NOT_APPLICABLE]
    out: dict[str, list[str]] = {}
    for name in names:
        family = V4 if V4_CONVENTION in load_recipe(name).conventions else V3
        out.setdefault(family, []).append(name)
    return out


def run_demo(out_dir: Path, recipes: list[str], *, seq_len: int | None = None, max_tokens: int | None = None,
             device: str = "cpu", calibrate: bool = True, threads: int | None = None,
             progress: bool = False, family: str = V3) -> dict:  # fmt: skip
    """Convert the family's demo model with each recipe into out_dir/<recipe>, then one eval pass over all of them.

    With calibrate, NVFP4 recipes are also converted with activation scales calibrated on the calibration text
    shipped with the demo (a slice of its training split; rows "<recipe>+calib"), so the table shows calibrated
    against the default scales. seq_len / max_tokens None: the demo's own settings (dsquant_demo.json).
    """
    from dsquant.convert import convert
    from dsquant.demo import demo_model_dir, demo_settings
    from dsquant.devices import cpu_threads
    from dsquant.progress import Progress
    from dsquant.recipe import load_recipe
    from dsquant.runner.calibrate import calibrate as run_calibration
    from dsquant.runner.data import shipped_text
    from dsquant.runner.evaluate import evaluate, load_text

    src = demo_model_dir(family)
    settings = demo_settings(src)
    seq_len = seq_len or settings.get("context_length")
    max_tokens = max_tokens or settings.get("eval_tokens")
    # the recipes with NVFP4 weights, whose activation scales calibration sets (convert --calibrate's rule)
    to_calibrate = [r for r in recipes if calibrate and "nvfp4" in load_recipe(r).formats()]
    nvfp4 = bool(to_calibrate)
    jobs = [(r, False) for r in recipes] + [(r, True) for r in to_calibrate]
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
    out["base"].update(name=SOURCE_NAMES[family], bytes=_size(Path(src)))
    out["family"] = family
    return out


def print_demo_table(out: dict) -> None:
    """One family's table: its protocol line, then source and recipe rows."""
    p = out["protocol"]
    arch = "DeepSeek-V4" if out.get("family") == V4 else "DeepSeek-V3"
    typer.echo(f"demo ({arch}): {p['tokens_scored']} tokens of {p['text']['source']} ({p['windows']} windows x "
               f"{p['seq_len']}), each recipe against the source, {p['impl']} on {p['device']}")  # fmt: skip
    w = 42
    typer.echo(f"{'recipe':<{w}} {'size':>8} {'ppl':>8} {'delta':>8} {'KLD':>9} {'top-1':>7}")
    b = out["base"]
    typer.echo(f"{b['name']:<{w}} {b['bytes'] / 1e6:>6.2f}MB {b['ppl']:>8.4f} {'-':>8} {'-':>9} {'-':>7}")
    for r in out["results"]:
        typer.echo(f"{r['name']:<{w}} {r['bytes'] / 1e6:>6.2f}MB {r['ppl']:>8.4f} {r['delta_ppl_pct']:>+7.2f}% "
                   f"{r['kld']:>9.5f} {100 * r['top1']:>6.2f}%")  # fmt: skip
    if out.get("family") == V4:
        for name, why in V4_NOT_APPLICABLE.items():
            typer.echo(f"  not shown: {name}: {why}")


@app.command("demo")
def demo(
    out: Path = typer.Option(None, "--out", show_default=False,
                             help="Keep the converted checkpoints here, one folder per row (DIR/<recipe>) "
                                  "[default: a temporary folder]."),
    recipe: list[str] = typer.Option(None, "--recipe", "-r", show_default=False,
                                     help="Recipes to run (repeatable); DeepSeek-V4 recipes (v4-*) run on the V4 "
                                          "demo [default: every shipped recipe that applies]."),
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
    """Convert the bundled demo models (a small DeepSeek-V3 shipped in FP8 and a small DeepSeek-V4 shipped in the
    V4 release's FP8 + MXFP4 layout, both trained on the Python stdlib source) with every shipped recipe that
    applies, evaluate each against its source on the held-out text shipped with them, and print one table per
    model: recipe, size, perplexity, delta perplexity, KL divergence and top-1 agreement. --json prints
    {family: result}. Progress goes to stderr.

    Examples:

    \b
      dsquant demo
      dsquant demo --recipe nvfp4 --no-calibrate --out ./demo-out   (keeps ./demo-out/nvfp4)
      dsquant demo --recipe v4-nvfp4                                 (the DeepSeek-V4 table only)
    """
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if any(out.iterdir()):
            fail(f"--out {out}: folder is not empty")
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="dsquant-demo-") as tmp:
            for family, names in demo_recipes(recipe).items():
                results[family] = run_demo(out or Path(tmp), names, seq_len=seq_len, max_tokens=max_tokens,
                                           device=device, calibrate=calibrate, threads=threads,
                                           progress=not as_json, family=family)  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for i, result in enumerate(results.values()):
        if i:
            typer.echo("")
        print_demo_table(result)
