"""`dsquant convert [SRC] [DST] --recipe NAME ...`: a thin mapping of options onto dsquant.convert.convert."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import typer

from dsquant.cli.app import THREADS, app, fail
from dsquant.units import human_bytes

log = logging.getLogger(__name__)
# = dsquant.runner.calib_search's METHODS and DEFAULT_SAMPLE_ROWS (not imported: that pulls in torch at CLI start;
# tests/runner/test_calibration_search.py keeps them equal)
CALIB_METHODS = ("mse", "amax")
CALIB_ROWS = 256


def _print_plan(summary) -> None:
    rows = sorted(summary.plan, key=lambda r: -r["bytes_in"])
    typer.echo(f"{'tensor pattern':<52} {'rule':<24} {'format':<10} {'count':>6} {'in':>10} {'out':>10}")
    for r in rows:
        typer.echo(f"{r['pattern']:<52} {r['rule']:<24} {r['format']:<10} {r['count']:>6} "
                   f"{human_bytes(r['bytes_in']):>10} {human_bytes(r['bytes_out']):>10}")
    typer.echo(f"dry run: {summary.src} -> {summary.dst} as {summary.recipe} ({summary.convention}); "
               f"{human_bytes(summary.bytes_in)} in, {human_bytes(summary.bytes_out)} out in {summary.shards} "
               f"shard(s), "
               f"ratio {summary.ratio:.2f}x; plan validated, nothing written")


def _calibration(src: str | None, text_file: Path, device: str, method: str, rows: int,
                 threads: int | None = None, progress: bool = True) -> dict[str, float]:  # fmt: skip
    """Run the layer-streamed calibration pass of the source on `text_file`: {module: activation input scale}."""
    if method not in CALIB_METHODS:
        raise ValueError(f"--calib-method {method!r}: choose one of {', '.join(CALIB_METHODS)}")
    if rows < 1:
        raise ValueError(f"--calib-rows {rows}: must be at least 1")
    from dsquant.runner.calibrate import calibrate_all
    from dsquant.runner.data import read_user_text

    text = read_user_text(text_file, "--calibrate")

    if src is None:
        from dsquant.demo import demo_model_dir

        source = demo_model_dir()
    else:
        from dsquant.checkpoint.hub_source import resolve_source

        source = resolve_source(src)
    cal = calibrate_all(str(source), text, device=device, method=method, sample_rows=rows, threads=threads,
                        progress=progress)  # fmt: skip
    log.info("calibration (%s): %d linear input scales", method, len(cal.input_scales))
    if kv := cal.kv_scales():  # the MLA latent cache's (DeepSeek-V4 has none)
        log.info("calibration: FP8 KV-cache scales per layer, max(amax / 448, 1), not written (no engine loads an "
                 "MLA k_scale from a DeepSeek checkpoint): %s", kv)
    if idle := cal.idle_experts:
        worst = max(idle, key=idle.get)
        log.warning("calibration: %d routed expert(s) in %d MoE layer(s) saw no calibration token (layer %d: %d of "
                    "%d); they take the largest scale of the same projection in their layer (a layer where no expert "
                    "saw one keeps the recipe default). More, or more varied, text reaches more experts.",
                    sum(idle.values()), len(idle), worst, idle[worst], cal.n_routed_experts)
    if hot := cal.saturating_layers():
        log.warning("calibration: the MLA latent exceeds 448 in layer(s) %s (max |x| %s); an FP8 KV cache at scale "
                    "1.0, what vLLM and SGLang run for DeepSeek, saturates there: serve with a BF16 KV cache",
                    list(hot), [round(a, 1) for a in hot.values()])
    return cal.input_scales


def _check_calibratable(recipe: str) -> None:
    """--calibrate sets NVFP4 activation scales; a recipe without NVFP4 weights has none to set, so the pass
    would run and change nothing."""
    from dsquant.recipe import load_recipe

    rec = load_recipe(recipe)
    if "nvfp4" not in rec.formats():
        raise ValueError(f"--calibrate: recipe {rec.name} has no NVFP4 weights, so there is no activation scale to "
                         f"calibrate ({', '.join(sorted(rec.formats()))} scale activations at run time or not at all); "
                         "drop --calibrate, or use an nvfp4 recipe")


@app.command("convert")
def convert(
    src: str = typer.Argument(None, show_default=False,
                              help="Source: a local Hugging Face checkpoint folder, or hf://org/name "
                                   "(hf://org/name@revision for a branch or commit). Omitted, or `demo`: the bundled "
                                   "demo model (a folder named demo is written ./demo)."),
    dst: str = typer.Argument(None, show_default=False,
                              help="Output folder (new or empty). Omitted: ./<model-name>-<recipe>."),
    recipe: str = typer.Option("nvfp4", "--recipe", "-r",
                               help="Shipped recipe name (see `dsquant recipes`) or a path to a .toml recipe."),
    fmt: str = typer.Option("auto", "--format", "-f",
                            help="On-disk convention: auto (the recipe's first), deepseek, modelopt or "
                                 "compressed-tensors."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda (one worker per visible GPU) or cuda:N."),
    workers: int = typer.Option(None, "--workers", "-w", show_default=False,
                                help="Output shards in flight at once, on the CPU or on each GPU [default: 1 on the "
                                     "CPU, 2 per GPU]."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB or 500MB."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted conversion in DST."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (per tensor pattern: rule, format, count, "
                                                         "bytes in/out) after validating it; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or plan) as JSON on stdout."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Upload DST to this Hub repo (ORG/NAME) when done "
                                    "(the token is checked before converting)."),
    calibrate: Path = typer.Option(None, "--calibrate", help="UTF-8 text file (NVFP4 recipes only): set NVFP4 "
                                   "activation scales "
                                   "(input_scale / input_global_scale) from the source model's own activations on "
                                   "this text, through the layer-streamed runner. Without it the documented "
                                   "default (input_scale 1.0) is written. Also measures each layer's MLA latent "
                                   "range and warns where an FP8 KV cache would saturate (no KV scales are written: "
                                   "no engine applies one to DeepSeek MLA)."),
    calib_method: str = typer.Option(None, "--calib-method", show_default=False,
                                     help="With --calibrate: mse (per linear, the power of two with the least NVFP4 "
                                          "error on a sample of its inputs, from 1/4-1/2 to 4-8x the amax rule, "
                                          "taking the most headroom that costs nothing) or amax (amax / 2688) "
                                          "[default: mse]."),
    calib_rows: int = typer.Option(CALIB_ROWS, "--calib-rows", help="With --calibrate: input rows "
                                   "sampled per linear for the mse search (memory: one layer's samples)."),
    threads: int = THREADS,
) -> None:
    """Convert a DeepSeek-family checkpoint (BF16 or DeepSeek FP8) into a quantized checkpoint that vLLM, SGLang
    and TensorRT-LLM load as it is.

    Streams tensor by tensor (memory does not grow with model size), checks the result against the engines'
    loading rules and writes a model card. If interrupted, run the same command with --resume.

    Examples:

    \b
      dsquant convert hf://deepseek-ai/DeepSeek-V3 ./V3-nvfp4 --recipe nvfp4 --format modelopt
      dsquant convert demo ./demo-int8 --recipe int8
    """
    from dsquant.convert import convert as run_convert

    if fmt not in ("auto", "deepseek", "modelopt", "compressed-tensors"):
        fail(f"--format {fmt!r}: choose auto, deepseek, modelopt or compressed-tensors")
    if calib_method is not None and calibrate is None:
        fail("--calib-method needs --calibrate TEXT_FILE (the text to calibrate on)")
    if src == "demo" and not Path("demo").is_dir():
        src = None  # the bundled demo
    start = time.perf_counter()
    try:
        if calibrate is not None:
            _check_calibratable(recipe)
        if push_to_hub and not dry_run:
            from dsquant.checkpoint.hub_source import validate_repo_id
            from dsquant.publish import check_token

            validate_repo_id(push_to_hub)
            check_token()
        calibration = (_calibration(src, calibrate, device, calib_method or "mse", calib_rows, threads,
                                    progress=not as_json)
                       if calibrate is not None and not dry_run else None)  # fmt: skip
        calibration_s = time.perf_counter() - start
        calib_options = ("--calibrate", str(calibrate.resolve()), "--calib-method", calib_method or "mse",
                         "--calib-rows", str(calib_rows)) if calibration is not None else ()
        summary = run_convert(src, dst, recipe, convention=fmt, device=device, workers=workers,
                              max_shard_size=max_shard_size, resume=resume, dry_run=dry_run,
                              progress=sys.stderr.isatty() and not as_json, push_to_hub=push_to_hub,
                              calibration=calibration, resume_options=calib_options)
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:  # ENOSPC, EROFS, EACCES while writing: one line naming the file
        fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    if calibration is not None:  # the summary's time is the whole command's, calibration included
        summary.seconds = time.perf_counter() - start
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    elif dry_run:
        _print_plan(summary)
    else:
        typer.echo(f"converted {summary.src} -> {summary.dst} ({summary.recipe}, {summary.convention}): "
                   f"{human_bytes(summary.bytes_in)} in, {human_bytes(summary.bytes_out)} out "
                   f"(ratio {summary.ratio:.2f}x), "
                   f"{summary.seconds:.1f} s"
                   + (f" ({calibration_s:.1f} s calibrating)" if calibration is not None else "")
                   + f", {summary.gb_per_s:.2f} GB/s"
                   + (f", {summary.resumed_shards} shard(s) kept from the interrupted run" if summary.resumed_shards
                      else ""))
        res = summary.results
        if res.get("expert_blocks"):
            typer.echo(f"experts: {res['expert_blocks_exact']:,} of {res['expert_blocks']:,} 32-element blocks kept "
                       f"their values (largest change elsewhere {res['max_expert_abs_error']:.3g})")
        if res.get("dense_requantized"):
            typer.echo(f"dense: {res['dense_requantized']} FP8 weight(s) re-quantized with power-of-two scales "
                       "(their float32 scales were no powers of two)")
