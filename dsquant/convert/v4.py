"""DeepSeek-V4 conversion: which recipe, what happens to each tensor, and the numbers (deepseek-v4.md 1, 3).

V4 checkpoints keep their official layout whatever the recipe (unprefixed names, `.scale` grids), so a V4 recipe
(recipes/v4-*.toml, convention "deepseek-v4") only says what the *quantized* linears become; every BF16 / F32 /
I64 tensor is copied byte for byte (names_v4.KEEP says why engines need each as it is). Per linear:

    routed expert, rule format F   "transcode" to F (fp8-block | nvfp4 | mxfp4) from the stored MXFP4 (instruct) or
                                   FP8 (-Base) expert; "copy" when already F, or matched by an [[ignore]] entry
    dense FP8 linear (fp8-block)   "rescale": FP8 bytes copied, `.scale` in the dtype engines need beside the
                                   output experts (F8_E8M0 beside FP4 / NVFP4, float32 beside FP8: vLLM
                                   DeepseekV4FP8Config.is_scale_e8m0); "copy" when it already is

`--format compressed-tensors` (a recipe listing that convention, v4-nvfp4) writes the same values in the layout
vLLM's compressed-tensors path loads for V4 (RedHatAI/DeepSeek-V4-Flash-NVFP4-FP8's): official module names, each
quantized linear in compressed-tensors' tensor names (formats.ondisk) with float32 `weight_scale` grids beside the
FP8 bytes, NVFP4 globals as divisors, and experts an [[ignore]] entry keeps in their stored MXFP4 relabelled as
`mxfp4-pack-quantized` (the same bytes); v4_config writes its config groups. Unquantized tensors stay as
stored: vLLM builds compressor `fused_wkv_wgate` and indexer `weights_proj` with `quant_config=None`
(vllm/models/deepseek_v4/compressor.py, attention.py DeepseekV4Indexer).

The plan, shards, manifest and resume are plan / pipeline / process's: this module builds the
module jobs (`plan_conversion`) and processes the items whose actions are in ACTIONS (`process_item`), adding to
the shard's stats how many 32-element expert blocks kept their values (formats.transcode) and how many dense
weights had to be re-quantized because a float32 scale was no power of two.
"""

from __future__ import annotations

import torch

from dsquant.checkpoint.names_v4 import blocks, official_name, scale_name
from dsquant.checkpoint.reader import Checkpoint
from dsquant.convert.plan import ModuleJob, Plan, lay_out_plan
from dsquant.formats.fp8 import dequantize_fp8_block
from dsquant.formats.mxfp4 import E8M0_DTYPE, e8m0_from_float, e8m0_to_float
from dsquant.formats.nvfp4 import nvfp4_global_scale
from dsquant.formats.ondisk import stored_specs, write_quantized
from dsquant.formats.registry import FORMATS, find, get
from dsquant.formats.transcode import Exactness, mxfp4_to_fp8_block, mxfp4_to_nvfp4, nvfp4_shared_exponent
from dsquant.formats.weight import QuantizedWeight
from dsquant.recipe import Ignore, Recipe, load_recipe
from dsquant.recipe_files import resolve_recipe_path

V4_CONVENTION = "deepseek-v4"
CT_CONVENTION = "compressed-tensors"
ACTIONS = ("transcode", "rescale", "rename")
OFFICIAL_NAMES = "v4-official-names"
# formats V4 engines build routed experts in (an expert_dtype for them) and keep dense linears in
EXPERT_FORMATS = tuple(name for name, f in FORMATS.items() if f.expert_dtype is not None)
DENSE_FORMATS = tuple(name for name, f in FORMATS.items() if f.block_grid)
# `--recipe NAME` on a V4 checkpoint -> the shipped V4 recipe
V4_RECIPES = {"fp8-block": "v4-fp8-block", "nvfp4": "v4-nvfp4", "nvfp4-experts-only": "v4-nvfp4",
              "mxfp4": "v4-mxfp4"}
ENGINES_CHECKED = ("vLLM vllm/models/deepseek_v4/quant_config.py (DeepseekV4FP8Config), SGLang "
                   "python/sglang/srt/models/deepseek_v4.py, TensorRT-LLM _torch/models/modeling_deepseekv4.py")
# Recipes no engine serves on a V4 checkpoint, refused before anything is read beyond the headers.
REFUSED = {
    "int8": "no engine serves DeepSeek-V4 as INT8 W8A8 on GPUs: vLLM's DeepseekV4FP8Config builds FP8 block linears "
            "with MXFP4, NVFP4 or FP8 experts only, SGLang's V4 loader reads FP8 linears with FP4 / FP8 / W4A16 "
            "experts (its W8A8 V4 path is Ascend-only), TensorRT-LLM's V4 loader reads FP8 with NVFP4 / MXFP4 experts",
    "fp8-block-ue8m0": "DeepSeek-V4 with FP8 experts needs float32 dense scales (vLLM DeepseekV4FP8Config: "
                       "is_scale_e8m0 only with expert_dtype fp4); --recipe fp8-block writes that layout, with "
                       "power-of-two scales",
}
_EXPERT = ".ffn.experts."
# what every unquantized tensor (BF16 / F32 / I64) resolves to: carried as stored (names_v4.KEEP says why)
UNQUANTIZED = Ignore("(unquantized tensors)", "BF16, F32 and I64 tensors are carried byte for byte: engines load "
                     "them as the release stores them")


def resolve_v4_recipe(recipe: str | Recipe, convention: str) -> tuple[Recipe, str]:
    """`--recipe` / `--format` on a V4 checkpoint -> (V4 recipe, "deepseek-v4"), or ValueError saying why not."""
    if isinstance(recipe, Recipe):
        rec = recipe
    elif recipe in REFUSED:
        raise ValueError(f"recipe {recipe!r} is refused for DeepSeek-V4: {REFUSED[recipe]} (checked: "
                         f"{ENGINES_CHECKED}); DeepSeek-V4 recipes: {', '.join(sorted(set(V4_RECIPES)))}")
    elif recipe in V4_RECIPES:
        rec = load_recipe(V4_RECIPES[recipe])
    else:
        path = resolve_recipe_path(recipe)
        rec = load_recipe(str(path))
    if V4_CONVENTION not in rec.conventions:
        raise ValueError(f"recipe {rec.name} is not a DeepSeek-V4 recipe (its conventions are {list(rec.conventions)}, "
                         f"not {V4_CONVENTION!r}); for V4 use one of {', '.join(sorted(set(V4_RECIPES)))}")
    if convention == "auto":
        return rec, V4_CONVENTION
    if convention not in rec.conventions:
        others = [c for c in rec.conventions if c != V4_CONVENTION]
        also = f" or {others[0]} (--format {others[0]})" if others else ""
        raise ValueError(f"--format {convention}: recipe {rec.name} writes DeepSeek-V4 in the official layout "
                         f"engines load ({V4_CONVENTION}, --format auto){also}")
    return rec, convention


def _stored_format(ckpt: Checkpoint, weight: str) -> str:
    dtype = ckpt.infos[weight].dtype
    if dtype == torch.float8_e4m3fn:
        return "fp8-block"
    if dtype == torch.int8 and ckpt.infos[scale_name(weight)].dtype == E8M0_DTYPE:
        return "mxfp4"
    raise ValueError(f"{ckpt.path / ckpt.infos[weight].file}: {weight} is {dtype} with a "
                     f"{ckpt.infos[scale_name(weight)].dtype} scale: neither DeepSeek-V4 FP8 nor FP4")


def _logical_shape(ckpt: Checkpoint, weight: str) -> tuple[int, int]:
    return get(_stored_format(ckpt, weight)).logical_shape(tuple(ckpt.infos[weight].shape))


def _outputs(module: str, fmt: str, shape: tuple[int, int], dense_scale: torch.dtype, convention: str):
    """[(name, dtype, shape)] of one linear written as `fmt` in the official layout or compressed-tensors'."""
    return stored_specs(convention, fmt, module, shape, torch.bfloat16, grid_scale=dense_scale)


def _copy(ckpt: Checkpoint, module: str, names: list[str], entry, fmt: str = "keep") -> ModuleJob:
    """Bytes as stored, under the official names ("rename" where the source used transformers' saved names); fmt:
    the format a kept linear is stored in."""
    outputs = [(official_name(n), ckpt.infos[n].dtype, ckpt.infos[n].shape) for n in names]
    action = "copy" if [o[0] for o in outputs] == names else "rename"
    return ModuleJob(official_name(module), action, fmt, entry, names, outputs)


def _linears(ckpt: Checkpoint) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(quantized linears: module -> [weight, scale], every other tensor: name -> [name]) in source reading order."""
    order = [i.name for i in sorted(ckpt.infos.values(), key=lambda i: (i.file, i.start))]
    linears, others = {}, {}
    for name in order:
        if name.endswith(".weight") and scale_name(name) in ckpt.infos:
            linears[name[: -len(".weight")]] = [name, scale_name(name)]
        elif not (name.endswith(".scale") and name[: -len(".scale")] + ".weight" in ckpt.infos):
            others[name] = [name]
    return linears, others


def plan_conversion(ckpt: Checkpoint, recipe: str | Recipe, convention: str, max_shard_size: int):
    """(recipe, convention, Plan) for a V4 checkpoint; ValueError naming the recipe rule or tensor at fault."""
    rec, convention = resolve_v4_recipe(recipe, convention)
    quantized = any(n.endswith(".scale") for n in ckpt.infos)
    if not quantized and rec.name != OFFICIAL_NAMES:
        raise ValueError(f"{ckpt.path}: this DeepSeek-V4 checkpoint holds no FP8 / FP4 weights (transformers saves V4 "
                         f"dequantized); dsquant converts V4 from the official FP8 / FP4 releases. Use --recipe "
                         f"{OFFICIAL_NAMES} to write it back in the official names engines load")
    if quantized and rec.name == OFFICIAL_NAMES:
        raise ValueError(f"recipe {OFFICIAL_NAMES} restores the official names of a checkpoint transformers saved; "
                         f"{ckpt.path} is quantized already")
    stages = tuple(b.stage for b in blocks(ckpt.config) if b.draft == "dspark")
    compiled = rec.compiled((), stages)
    linears, others = _linears(ckpt)
    resolved, unmatched = {}, []
    for module in linears:
        entry = compiled.resolve(module)
        if entry is None:
            unmatched.append(module)
        elif not isinstance(entry, Ignore) and entry.format not in (EXPERT_FORMATS if _EXPERT in module
                                                                    else DENSE_FORMATS):
            kind = "a routed expert" if _EXPERT in module else "a dense FP8 linear"
            raise ValueError(f"recipe {rec.name}: rule {entry.match!r} makes {module} ({kind}) {entry.format}; "
                             f"DeepSeek-V4 converts routed experts to {list(EXPERT_FORMATS)} and keeps dense linears "
                             f"{' / '.join(DENSE_FORMATS)}")
        resolved[module] = entry
    if unmatched:
        raise ValueError(f"recipe {rec.name}: {len(unmatched)} quantized linear(s) match no ignore entry or rule, "
                         f"e.g. {unmatched[0]}; add a [[rules]] or [[ignore]] entry for them")
    target = {m: (_stored_format(ckpt, w) if isinstance(resolved[m], Ignore) else resolved[m].format)
              for m, (w, _) in linears.items()}
    backbone = {f for m, f in target.items() if _EXPERT in m and not m.startswith("mtp.")}
    if len(backbone) > 1:
        raise ValueError(f"recipe {rec.name}: routed experts would be stored as {sorted(backbone)}; engines build "
                         f"every backbone expert with one method, so give them one format")
    dense_scale = torch.float32 if expert_dtype(backbone) == "fp8" else E8M0_DTYPE
    jobs: dict[str, ModuleJob] = {}
    for module, names in linears.items():
        entry, weight = resolved[module], names[0]
        source = _stored_format(ckpt, weight)
        outputs = _outputs(module, target[module], _logical_shape(ckpt, weight), dense_scale, convention)
        kept = isinstance(entry, Ignore) and convention == V4_CONVENTION
        if kept or [(n, d) for n, d, _ in outputs] == [(n, ckpt.infos[n].dtype) for n in names]:
            jobs[module] = _copy(ckpt, module, names, entry, source)
        else:
            action = "transcode" if _EXPERT in module else "rescale"
            jobs[module] = ModuleJob(module, action, target[module], entry, names, outputs, get(source).block_grid)
    for name, names in others.items():
        jobs[name] = _copy(ckpt, name, names, UNQUANTIZED)
    plan = lay_out_plan(ckpt, jobs, rec, convention, max_shard_size, "fp8", [], family="v4")
    return rec, convention, plan


# ---------------------------------------------------------------------------------------------------- processing


def _add(stats: dict, ex: Exactness) -> None:
    stats["expert_blocks_exact"] = stats.get("expert_blocks_exact", 0) + ex.exact_blocks
    stats["expert_blocks"] = stats.get("expert_blocks", 0) + ex.total_blocks
    stats["max_expert_abs_error"] = max(stats.get("max_expert_abs_error", 0.0), ex.max_abs_error)


def _dequantized(ckpt: Checkpoint, weight: str) -> torch.Tensor:
    """An FP8 weight (E8M0 or float32 grid) as float32 values, exactly."""
    scale = ckpt.get(scale_name(weight))
    scale = e8m0_to_float(scale) if scale.dtype == E8M0_DTYPE else scale.float()
    return dequantize_fp8_block(ckpt.get(weight), scale, dtype=torch.float32)


def _quantize(fn, x: torch.Tensor, weight: str, device, *args, **kw):
    """One of the convert quantizers (quantizers.py) on `device`, results on the CPU."""
    return [t.cpu() for t in fn(x.to(device), *args, name=weight, **kw)]


def _nvfp4_item(ckpt: Checkpoint, item: list[ModuleJob], qz, device, calibration, stats: dict):
    """Fused partners to NVFP4 with one weight_scale_2 and one input_scale."""
    scales = [calibration[j.module] for j in item if calibration and j.module in calibration]
    input_scale = torch.tensor(max(scales) if scales else item[0].rule.input_scale, dtype=torch.float32)
    if not item[0].fp8_source:  # MXFP4: ModelOpt's closed form, global scale 2^m shared by the partners
        m = nvfp4_shared_exponent(*(ckpt.get(j.sources[1]) for j in item))
        for job in item:
            packed, block, glob, ex = mxfp4_to_nvfp4(ckpt.get(job.sources[0]), ckpt.get(job.sources[1]), m,
                                                     name=job.sources[0])
            _add(stats, ex)
            yield job, (packed, block, glob, input_scale)
        return
    values = {j.module: _dequantized(ckpt, j.sources[0]) for j in item}
    glob = nvfp4_global_scale(torch.stack([v.abs().amax() for v in values.values()]).amax())
    for job in item:
        packed, block = _quantize(qz.nvfp4, values.pop(job.module), job.sources[0], device, glob.to(device))[:2]
        yield job, (packed, block, glob, input_scale)


def _expert(ckpt: Checkpoint, job: ModuleJob, qz, device, stats: dict):
    """One routed expert to fp8-block (from MXFP4), mxfp4 (from FP8), or MXFP4 relabelled as compressed-tensors'
    uint8 codes and E8M0 bytes."""
    weight, scale = job.sources
    if get(job.fmt).block_grid:
        q, s, ex = mxfp4_to_fp8_block(ckpt.get(weight), ckpt.get(scale), name=weight)
        _add(stats, ex)
        return q, s  # float32: FP8 experts take float32 scales (vLLM Fp8MoEMethod)
    if not job.fp8_source:
        return ckpt.get(weight).view(torch.uint8), ckpt.get(scale).view(torch.uint8)
    packed, s = _quantize(qz.mxfp4, _dequantized(ckpt, weight), weight, device, scale_rule=job.rule.scale_rule)
    if job.outputs[0][1] == torch.uint8:  # compressed-tensors stores codes and scales as uint8
        return packed, s
    return packed.view(torch.int8), s.view(E8M0_DTYPE)


def _rescale(ckpt: Checkpoint, job: ModuleJob, qz, device, stats: dict):
    """A dense FP8 linear with its scale retyped: E8M0 -> float32 always exact; float32 -> E8M0 exact for powers of
    two, else the weight is re-quantized with power-of-two scales (counted in stats["dense_requantized"])."""
    weight, scale = job.sources
    want = job.outputs[1][1]
    s = ckpt.get(scale)
    if want == torch.float32:
        return ckpt.raw(weight), (e8m0_to_float(s) if s.dtype == E8M0_DTYPE else s)
    try:
        return ckpt.raw(weight), e8m0_from_float(s)
    except ValueError:
        stats["dense_requantized"] = stats.get("dense_requantized", 0) + 1
        q, s = _quantize(qz.fp8_block, _dequantized(ckpt, weight), weight, device, ue8m0=True)
        return q, e8m0_from_float(s)


def process_item(ckpt: Checkpoint, item: list[ModuleJob], qz, device, calibration, stats: dict):
    """Yield (output name, tensor or raw bytes) for one V4 item (a module, or an expert's w1 + w3), in plan order."""
    target = find(item[0].fmt)
    if target is not None and target.has_global_scale and item[0].action == "transcode":
        for job, tensors in _nvfp4_item(ckpt, item, qz, device, calibration, stats):
            if job.outputs[0][0].endswith(".weight_packed"):  # compressed-tensors: its names, globals as divisors
                yield from write_quantized(job.module, QuantizedWeight("nvfp4", *tensors), CT_CONVENTION).items()
            else:
                yield from zip([n for n, _, _ in job.outputs], tensors)
        return
    for job in item:
        if job.action in ("copy", "rename"):
            for (name, _, _), source in zip(job.outputs, job.sources):
                yield name, ckpt.raw(source)
            continue
        tensors = _expert(ckpt, job, qz, device, stats) if job.action == "transcode" else \
            _rescale(ckpt, job, qz, device, stats)
        yield from zip([n for n, _, _ in job.outputs], tensors)


def expert_dtype(backbone) -> str:
    """config.json's expert_dtype for backbone experts stored in the formats `backbone`: "fp8" when all are FP8
    blocks, else "fp4" (also with no quantized expert)."""
    return "fp8" if {get(f).expert_dtype for f in backbone} == {"fp8"} else "fp4"


def expert_formats(plan: Plan) -> dict[str, str]:
    """Routed expert module -> the format it is written in (kept experts: the format they are stored in)."""
    out = {}
    for job in plan.jobs():
        if _EXPERT in job.module:
            names = {n.rsplit(".", 1)[-1]: d for n, d, _ in job.outputs}
            out[job.module] = ("nvfp4" if "weight_scale_2" in names or "weight_global_scale" in names else
                               "mxfp4" if "weight_packed" in names or names["weight"] == torch.int8 else "fp8-block")
    return out
