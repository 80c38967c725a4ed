"""`convert`: stream a DeepSeek checkpoint into a quantized one. plan -> validate -> per-shard processing -> finalize.

Memory is bounded per worker by one source tensor plus one module's outputs and a few tensors queued for
writing, whatever the model size: tensors are fetched by name from whichever source shard holds them, never
by loading a shard. Each output shard is written under a temporary name, fsynced and renamed,
then recorded with its checksum in the manifest, so a killed run resumes (`resume=True`) to a result that
is byte-identical to an uninterrupted one. See plan.py (planning), process.py (numbers and
writing) and config.py (configs and the record of what was done).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsquant.checkpoint.identity import identity_difference, source_identity
from dsquant.checkpoint.index import RECIPE_FILE, write_index, write_json_atomic
from dsquant.checkpoint.manifest import LOCK_NAME, DstLock, Manifest
from dsquant.checkpoint.names_v4 import is_v4
from dsquant.checkpoint.reader import Checkpoint
from dsquant.convert import v4
from dsquant.convert.config import copy_non_weight_files, recipe_record, utc_now, write_configs
from dsquant.convert.plan import Plan, build_plan
from dsquant.convert.process import write_shard
from dsquant.convert.quantizers import select_quantizers
from dsquant.devices import resolve_devices, usable_cores
from dsquant.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


@dataclass
class ConvertSummary:
    """What a conversion did (or, with dry_run, would do)."""

    src: str
    dst: str
    recipe: str
    convention: str
    source_dtype: str
    device: str
    workers: int
    quantizers: str
    bytes_in: int
    bytes_out: int
    ratio: float
    seconds: float
    gb_per_s: float
    shards: int
    resumed_shards: int
    tensors: dict
    dry_run: bool
    plan: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    results: dict = field(default_factory=dict)  # measured while converting (V4: expert blocks kept exact)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(size: str | int) -> int:
    """"5GB" (decimal, as Hugging Face writes shard sizes), "500MiB", or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _resolve_source(src) -> tuple[Path, dict]:
    if src is None:
        from dsquant.demo import demo_model_dir

        path = demo_model_dir()
        return path, {"path": str(path)}
    text = str(src)
    if text.startswith("hf://"):
        from dsquant.checkpoint.hub_source import parse_hf_spec, resolve_source

        repo, rev = parse_hf_spec(text)
        return Path(resolve_source(text)), {"repo_id": repo, "revision": rev or "main"}
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"{path}: source checkpoint folder not found")
    return path, {"path": str(path.resolve())}


def _load_calibration(calibration) -> dict[str, float] | None:
    if calibration is None:
        return None
    if isinstance(calibration, (str, Path)):
        try:
            calibration = json.loads(Path(calibration).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{calibration}: unreadable calibration file ({e})") from None
    out = {}
    for module, value in dict(calibration).items():
        if not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(f"calibration: input scale of {module!r} must be a positive finite number, got {value!r}")
        out[str(module)] = float(value)
    return out


def _make_dst(dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: destination exists and is not a folder")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{dst}: cannot create the destination folder ({e.strerror})") from None
    if not os.access(dst, os.W_OK | os.X_OK):
        raise ValueError(f"{dst}: destination folder is not writable")


def _source_name(source: dict, identity: dict) -> str:
    """How the refusal and the resume command name a source: its folder, or hf://repo@commit."""
    if "repo_id" in source:
        return f"hf://{source['repo_id']}@{identity.get('commit') or source['revision']}"
    return source["path"]


def _run_record(ckpt: Checkpoint, source: dict, dst: Path, recipe, rec: Recipe, convention: str, max_shard_size,
                calibration: dict | None, resume_options, plan: Plan) -> dict:
    """What the manifest binds a resume to, and the command that finishes the run."""
    identity = source_identity(ckpt.path, ckpt.files)
    name = _source_name(source, identity)
    recipe_arg = recipe if isinstance(recipe, str) and not Path(recipe).is_file() else \
        str(Path(recipe).resolve()) if isinstance(recipe, (str, Path)) else rec.name
    command = ["dsquant", "convert", name, str(dst.resolve()), "--recipe", str(recipe_arg), "--format", convention,
               "--max-shard-size", str(max_shard_size), *resume_options, "--resume"]
    digest = None if calibration is None else \
        hashlib.sha256(json.dumps(calibration, sort_keys=True).encode()).hexdigest()
    return {"source": name, "identity": identity, "calibration": digest, "shards": len(plan.shards),
            "command": command}


def _resume_state(dst: Path, resume: bool, plan: Plan, run: dict) -> Manifest | None:
    """Under the lock: the manifest to resume from, None for a fresh start, or ValueError saying what to do."""
    manifest = Manifest.load(dst)
    if manifest is not None:
        finish = f"`{manifest.resume_command}`" if manifest.resume_command else "the same command with --resume"
        if not resume:
            raise ValueError(f"{dst}: holds an unfinished conversion; run the same command with --resume to finish "
                             f"it ({finish}), or delete the folder to start again")
        recorded = manifest.run.get("identity")
        if recorded is None:
            raise ValueError(f"{dst}: the unfinished conversion there did not record which source it read, so "
                             f"resuming could mix two models; delete the folder and convert again")
        diff = identity_difference(recorded, run["identity"])
        if diff is not None:
            raise ValueError(f"{dst}: the unfinished conversion there is of {manifest.run.get('source')}, not of "
                             f"{run['source']} ({diff}); finish it from its own source with {finish}, or convert "
                             f"{run['source']} into a new, empty destination")
        if manifest.fingerprint != plan.fingerprint:
            raise ValueError(f"{dst}: the unfinished conversion there used another recipe, format, "
                             f"--max-shard-size or source layout; resume with the same settings ({finish}), or "
                             f"delete the folder")
        calibrated = manifest.run.get("calibration")
        if calibrated != run["calibration"]:
            how = "not calibrated" if calibrated is None else \
                "calibrated on other values" if run["calibration"] else "calibrated"
            raise ValueError(f"{dst}: the unfinished conversion there was {how}; resume with the same calibration "
                             f"({finish}), or delete the folder")
        return manifest
    entries = [p.name for p in dst.iterdir() if p.name != LOCK_NAME]
    if (dst / RECIPE_FILE).is_file():
        raise ValueError(f"{dst}: already holds a finished dsquant conversion; choose another destination or "
                         f"delete it")
    if entries:
        raise ValueError(f"{dst}: folder is not empty and is not a dsquant output ({len(entries)} entries, e.g. "
                         f"{sorted(entries)[0]!r}); choose a new or empty destination")
    return None


# Default shards in flight per GPU: a second one overlaps one shard's reads with the other's arithmetic,
# writes and fsync (H100, 4.4 GB BF16 source: +13% to +32% over one, by recipe). On the CPU the row
# chunks of one shard already use every core.
GPU_WORKERS = 2


def _devices(device: str, workers: int | None) -> list[torch.device]:
    """One worker slot per (device, worker): `workers` shards in flight on each GPU (or on the CPU)."""
    devices = [torch.device(d) for d in resolve_devices(device)]
    if workers is None:
        workers = GPU_WORKERS if devices[0].type == "cuda" else 1
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    return devices * workers


def _run_shards(ckpt, plan, dst, devices, manifest, todo, calibration, progress) -> None:
    """Output shards on `devices` (one shard per worker at a time). On CPU, torch runs single-threaded and
    row chunks go to a pool of one thread per core instead: OpenMP's spinning threads slow every small op
    down several times when other processes share the cores (measured 5x on the 2-core host under load)."""
    qz = {str(d): select_quantizers(d) for d in set(devices)}
    total = sum(ckpt.infos[s].nbytes for shard in todo for item in shard.items for job in item for s in job.sources)
    threads = torch.get_num_threads()
    cpu = devices[0].type == "cpu"
    chunk_pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="dsquant-chunk") \
        if cpu else None
    if cpu:
        torch.set_num_threads(1)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert", disable=not progress,
               smoothing=0.1)
    try:
        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            futures = [pool.submit(write_shard, ckpt, shard, dst, plan.convention, qz[str(devices[i % len(devices)])],
                                   devices[i % len(devices)], calibration, manifest, bar, chunk_pool)
                       for i, shard in enumerate(todo)]
            done = len(plan.shards) - len(todo)
            bar.set_postfix_str(f"shards {done}/{len(plan.shards)}")
            try:
                for f in as_completed(futures):
                    f.result()
                    done += 1
                    bar.set_postfix_str(f"shards {done}/{len(plan.shards)}")
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()
        if chunk_pool is not None:
            chunk_pool.shutdown(wait=True)
        torch.set_num_threads(threads)


def _finalize(ckpt: Checkpoint, plan: Plan, dst: Path, source: dict, created: str, calibrated: bool,
              warnings: list[str]) -> int:
    """Index, configs, copied files, recipe record, loading check, model card. The caller then removes the
    manifest, the last step: until then every command sees an unfinished output (checkpoint.manifest)."""
    weight_map = {name: shard.file for shard in plan.shards for name, _, _ in shard.entries}
    total = sum(math.prod(s) * d.itemsize for shard in plan.shards for _, d, s in shard.entries)
    write_index(dst, weight_map, total)
    write_configs(ckpt.config, plan, dst)
    copy_non_weight_files(ckpt.path, dst)
    bytes_out = sum((dst / s.file).stat().st_size for s in plan.shards)
    source = {**source, "architectures": ckpt.config.get("architectures"), "model_type": ckpt.config.get("model_type"),
              "dtype": plan.source_dtype}
    write_json_atomic(dst / RECIPE_FILE, recipe_record(plan, source, bytes_out, created, calibrated))
    try:
        from dsquant.check import check_checkpoint
        from dsquant.check.structure import UNFINISHED
    except ImportError as e:
        warnings.append(f"dsquant.check is not available ({e}); the engine-loading check was skipped")
    else:
        # `unfinished` holds until this run removes its manifest, the step after this one
        errors = [f for f in check_checkpoint(dst) if f.severity == "error" and f.rule != UNFINISHED]
        if errors:
            (dst / RECIPE_FILE).unlink(missing_ok=True)  # an output that fails the check must not look complete
            shown = "; ".join(f"[{f.rule}] {f.message}" for f in errors[:5])
            raise ValueError(f"{dst}: the converted checkpoint fails {len(errors)} loading check(s): {shown}")
    try:
        from dsquant.model_card import write_model_card
    except ImportError as e:
        warnings.append(f"dsquant.model_card is not available ({e}); README.md was not written")
    else:
        write_model_card(dst)
    return bytes_out


def _v3_recipe(recipe: str | Recipe, convention: str) -> tuple[Recipe, str]:
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if convention == "auto":
        convention = rec.conventions[0]
    elif convention not in rec.conventions:
        raise ValueError(f"recipe {rec.name} cannot be written as {convention!r}; it supports {list(rec.conventions)}")
    if v4.V4_CONVENTION in rec.conventions:
        raise ValueError(f"recipe {rec.name} writes DeepSeek-V4's official layout; the source is not a DeepSeek-V4 "
                         f"checkpoint, so choose a recipe without the {v4.V4_CONVENTION} convention")
    return rec, convention


def convert(src=None, dst=None, recipe: str | Recipe = "nvfp4", *, convention: str = "auto", device: str = "cpu",
            workers: int | None = None, max_shard_size: str | int = "5GB", resume: bool = False, dry_run: bool = False,
            calibration=None, progress: bool = True, push_to_hub: str | None = None,
            resume_options: tuple[str, ...] = ()) -> ConvertSummary:
    """Convert checkpoint SRC into DST with a recipe. User errors raise ValueError naming the file or tensor.

    Args:
        src: checkpoint folder, `hf://org/name[@revision]`, or None for the bundled demo model.
        dst: output folder; None -> ./<source folder name>-<recipe name>.
        recipe: a shipped recipe name, a .toml path, or a Recipe.
        convention: "auto" (the recipe's first) | "deepseek" | "modelopt" | "compressed-tensors".
        device: "cpu" | "cuda" (one worker per visible GPU) | "cuda:N".
        workers: output shards in flight on the CPU, or on each GPU (default: 1 on the CPU, 2 per GPU).
        max_shard_size: output shard bound, e.g. "5GB".
        resume: finish an interrupted conversion in DST.
        dry_run: plan and validate only; nothing is written.
        calibration: {module name: NVFP4 activation global scale (amax / 2688)} or a JSON file of it.
        progress: show a tqdm bar over source bytes.
        push_to_hub: "org/name" to upload DST when done (dsquant.publish.push_to_hub).
        resume_options: the command-line options that produced `calibration` (--calibrate FILE ...), repeated
            in the resume command that an unfinished output names.
    """
    start = time.perf_counter()
    src_path, source = _resolve_source(src)
    calib = _load_calibration(calibration)
    devices = _devices(device, workers)
    ckpt = Checkpoint(src_path)
    if is_v4(ckpt.config):  # DeepSeek-V4: its own recipes and layout (v4), the same shard machinery
        rec, convention, plan = v4.plan_conversion(ckpt, recipe, convention, parse_size(max_shard_size))
    else:
        rec, convention = _v3_recipe(recipe, convention)
        qc = ckpt.quantization_config
        if qc and qc.get("quant_method") != "fp8":
            raise ValueError(f"{src_path / 'config.json'}: source is already quantized (quant_method "
                             f"{qc.get('quant_method')!r}); dsquant converts BF16 or DeepSeek FP8 checkpoints")
        plan = build_plan(ckpt, rec, convention, parse_size(max_shard_size))
    name = source.get("repo_id", str(src_path)).rstrip("/").split("/")[-1]
    dst_path = Path(dst) if dst is not None else Path.cwd() / f"{name}-{rec.name}"
    summary = ConvertSummary(str(src_path), str(dst_path), rec.name, convention, plan.source_dtype, device,
                             len(devices), select_quantizers(devices[0]).kind, plan.bytes_in, plan.bytes_out,
                             plan.bytes_in / max(plan.bytes_out, 1), 0.0, 0.0, len(plan.shards), 0,
                             dict(recipe_record(plan, {}, plan.bytes_out, "", False)["tensors"]), dry_run,
                             plan.table(ckpt))
    if dry_run:
        summary.seconds = time.perf_counter() - start
        return summary
    _make_dst(dst_path)
    run = _run_record(ckpt, source, dst_path, recipe, rec, convention, max_shard_size, calib, resume_options, plan)
    with DstLock(dst_path):
        manifest = _resume_state(dst_path, resume, plan, run)
        if manifest is None:
            manifest = Manifest(dst_path, plan.fingerprint, utc_now(), run=run)
            manifest.save()
        done = manifest.verified(dst_path)
        for stray in dst_path.glob(".*.partial"):
            stray.unlink()
        todo = [s for s in plan.shards if s.file not in done]
        summary.resumed_shards = len(plan.shards) - len(todo)
        _run_shards(ckpt, plan, dst_path, devices, manifest, todo, calib, progress)
        plan.results = summary.results = manifest.merged_stats()
        summary.bytes_out = _finalize(ckpt, plan, dst_path, source, manifest.created, calib is not None,
                                      summary.warnings)
        manifest.remove()
    for w in summary.warnings:
        log.warning(w)
    if push_to_hub:
        from dsquant.publish import push_to_hub as push

        push(dst_path, push_to_hub)
    summary.seconds = time.perf_counter() - start
    summary.ratio = plan.bytes_in / max(summary.bytes_out, 1)
    summary.gb_per_s = plan.bytes_in / 1e9 / max(summary.seconds, 1e-9)
    return summary
