"""DeepSeek-V4 names and inventory: the tensors config.json implies against those stored (deepseek-v4.md 1.3, 2.3).

- v4-namespace: tensors named in transformers' module namespace (`model.layers.N.self_attn...`, `model.embed_tokens`,
  or the mixed names transformers 5 `save_pretrained` writes: `model.layers.N.attn.norm.weight`, ...). vLLM's
  `_make_deepseek_v4_weights_mapper` and SGLang's `remap_weight_name_to_dpsk_hf_format` map only the official
  unprefixed names. Error; `dsquant convert` reads this namespace and writes the official one.
- v4-config: config.json cannot describe the layers (missing size fields, compress_ratios shorter than
  num_hidden_layers or holding a ratio other than 0 / 4 / 128). Error.
- v4-missing / v4-unexpected: an expected tensor (module, for quantized linears) is absent, or a stored tensor is
  not part of the layout (a compressor on a sliding layer, gate.bias on a hash layer, a draft stage the config does
  not declare). Engines build modules from config.json and fail on both. Error.
- v4-draft-missing: none of the MTP / DSpark draft tensors is stored although config.json declares the draft: the
  model serves, speculative decoding cannot be enabled (transformers drops `mtp.*` on load). Warning.
- v4-shape: a stored tensor (the unpacked [N, K] for quantized linears) differs from the shape config.json implies.
  Error.
"""

from __future__ import annotations

from dsquant.check.finding import MAX_LISTED, Finding
from dsquant.check.names import SCALE_PARAMS, logical_shape, module_format
from dsquant.checkpoint.names_v4 import Spec, expected_tensors, transformers_names
from dsquant.checkpoint.reader import Checkpoint

WEIGHT_PARAMS = ("weight", "weight_packed", "scale", *SCALE_PARAMS)


def listed(names: list[str]) -> str:
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def expected(view: Checkpoint) -> list[Spec]:
    """The official inventory config.json implies (cached on the view). KeyError / ValueError / TypeError when
    config.json cannot describe it."""
    if "v4_specs" not in view.cache:
        view.cache["v4_specs"] = expected_tensors(view.config or {})
    return view.cache["v4_specs"]


def module_of(spec: Spec) -> str:
    return spec.name[: -len(".weight")] if spec.name.endswith(".weight") else spec.name


def check(view: Checkpoint) -> list[Finding]:
    foreign = transformers_names(view.infos)
    if foreign:
        return [Finding("v4-namespace", "error", f"{len(foreign)} tensor(s) are named in transformers' namespace, "
                        f"not DeepSeek-V4's official one ({listed(foreign)}); vLLM and SGLang load only the official "
                        f"unprefixed names (transformers' save_pretrained writes these): rewrite them with "
                        f"`dsquant convert {view.location} <DST>`", tensor=foreign[0])]
    try:
        specs = expected(view)
    except (KeyError, ValueError, TypeError) as exc:
        what = f"field {exc} is missing" if isinstance(exc, KeyError) else str(exc)
        return [Finding("v4-config", "error", f"config.json cannot describe the DeepSeek-V4 layers: {what}",
                        file="config.json")]
    return _inventory(view, specs)


def _inventory(view: Checkpoint, specs: list[Spec]) -> list[Finding]:
    missing, shapes, covered = [], [], set()
    for spec in specs:
        params = view.modules.get(module_of(spec), {}) if spec.name.endswith(".weight") else {}
        if spec.name.endswith(".weight") and ("weight" in params or "weight_packed" in params):
            # the weight and whatever scales it has (whether it may have them is v4_dtypes' rule)
            covered |= {p.name for name, p in params.items() if name in WEIGHT_PARAMS}
            have = logical_shape(params, module_format(params))
        elif spec.name in view.infos:
            covered.add(spec.name)
            have = view.infos[spec.name].shape
        else:
            missing.append(spec.name)
            continue
        if tuple(have) != spec.shape:
            shapes.append(f"{spec.name} is {list(have)}, config.json implies {list(spec.shape)}")
    out = []
    draft = [n for n in missing if n.startswith("mtp.")]
    if draft and not any(n.startswith("mtp.") for n in view.infos):
        out.append(Finding("v4-draft-missing", "warning", f"config.json declares a draft ({len(draft)} mtp.* tensors) "
                           "but none is stored: the model serves, speculative decoding cannot be enabled "
                           "(transformers drops mtp.* on load; copy it through from the source)", tensor=draft[0]))
        missing = [n for n in missing if not n.startswith("mtp.")]
    if missing:
        out.append(Finding("v4-missing", "error", f"{len(missing)} tensor(s) that config.json implies are not "
                           f"stored: {listed(missing)}", tensor=missing[0]))
    unexpected = sorted(set(view.infos) - covered)
    if unexpected:
        out.append(Finding("v4-unexpected", "error", f"{len(unexpected)} stored tensor(s) are not part of the "
                           f"DeepSeek-V4 layout config.json describes (engines refuse unknown weights): "
                           f"{listed(unexpected)}", tensor=unexpected[0]))
    if shapes:
        out.append(Finding("v4-shape", "error", f"{len(shapes)} tensor(s) have another shape than config.json "
                           f"implies: {'; '.join(shapes[:MAX_LISTED])}", tensor=shapes[0].split()[0]))
    return out
