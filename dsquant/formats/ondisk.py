"""On-disk tensor names and scale directions of each checkpoint convention: the one place that knows them.

In code a `*_scale` always multiplies to dequantize (dsquant.formats). On disk (formats.md sections 2-4),
for a module M the tensors `M.<name>` are:

deepseek (`quant_method: fp8`), fp8-block:
    weight float8_e4m3fn [N, K]; weight_scale_inv float32 [ceil(N/128), ceil(K/128)] (a multiplier despite its name)
deepseek-v4 (`quant_method: fp8`, official names without `model.`; read by read_quantized, written by convert_v4):
    fp8-block: weight float8_e4m3fn [N, K]; scale float8_e8m0fnu (instruct) or float32 (Base) [ceil(N/128), ceil(K/128)]
    mxfp4 (routed experts, `expert_dtype: fp4`): weight int8 [N, K/2] (E2M1 pairs, even K low); scale
    float8_e8m0fnu [N, K/32]
    nvfp4 (routed experts, NVIDIA's ModelOpt release with `moe_quant_algo: NVFP4`): as modelopt below
compressed-tensors, fp8-block (`float-quantized`, strategy block):
    weight float8_e4m3fn [N, K]; weight_scale float32 [ceil(N/128), ceil(K/128)] (multiplier)
compressed-tensors, int8 (`int-quantized`, strategy channel):
    weight int8 [N, K]; weight_scale float32 [N, 1] (multiplier)
compressed-tensors, fp8-channel (`float-quantized`, strategy channel or tensor; read only, llm-compressor's
FP8_DYNAMIC and FP8 presets): weight float8_e4m3fn [N, K]; weight_scale [N, 1] or [1] in the model's dtype
    (multiplier; read as float32 [N, 1]); a static activation scale `input_scale` [1] (multiplier) with FP8
compressed-tensors, nvfp4 (`nvfp4-pack-quantized`):
    weight_packed uint8 [N, K/2]; weight_scale float8_e4m3fn [N, K/16];
    weight_global_scale float32 [1] = 1 / global_scale and input_global_scale float32 [1] = 1 / input_scale
    (both divisors)
compressed-tensors, mxfp4 (`mxfp4-pack-quantized`):
    weight_packed uint8 [N, K/2]; weight_scale uint8 [N, K/32] (E8M0 bytes); no global scale
modelopt (`quant_algo: NVFP4`), nvfp4:
    weight uint8 [N, K/2]; weight_scale float8_e4m3fn [N, K/16]; weight_scale_2 float32 [] = global_scale;
    input_scale float32 [] = activation global scale (all multipliers)
any convention, bf16 (excluded): weight in the source dtype (BF16), no scale tensors.

NVFP4 activation scale until calibration exists: `DEFAULT_NVFP4_INPUT_SCALE = 1.0`, i.e. an activation
amax of 448 * 6 = 2688 assumed. Engines accept any positive finite value (vLLM/SGLang/TRT-LLM use
alpha = input_scale * weight_scale_2 and quantize activations with 1 / input_scale). 1.0 is chosen because
its block scales (block amax / 6) then cover block amaxes from 6 * 2^-9 (E4M3's smallest subnormal) to 2688
without saturating, which spans DeepSeek's hidden activations including their outlier channels; the cost
is precision on blocks whose amax is below about 6 * 2^-6 (E4M3 subnormal scales). Calibrated scales
replace it (`convert(..., calibration=...)`), and dsquant_recipe.json records which was used.
"""

from __future__ import annotations

import torch

from dsquant.formats.mxfp4 import E8M0_DTYPE, e8m0_bytes
from dsquant.formats.registry import CONVENTIONS as _CONVENTIONS
from dsquant.formats.registry import FORMAT_CONVENTIONS, convention_of, get, layout
from dsquant.formats.weight import QuantizedWeight

CONVENTIONS = tuple(_CONVENTIONS)
# The formats a checkpoint can be written in (fp8-channel is read only).
FORMATS = tuple(FORMAT_CONVENTIONS)
DEFAULT_NVFP4_INPUT_SCALE = 1.0
# DeepSeek-V4 names the scale of `M.weight` `M.scale` (read only: deepseek-v4.md 1.3-1.5)
V4_SCALE = layout("deepseek-v4", "fp8-block").names["scale"]


def tensor_names(convention: str, fmt: str, module: str) -> dict[str, str]:
    """Role -> on-disk tensor name for one module: roles weight, scale, global_scale, input_scale."""
    return {role: f"{module}.{suffix}" for role, suffix in layout(convention, fmt, module).names.items()}


def stored_specs(convention: str, fmt: str, module: str, shape: tuple[int, int], src_dtype: torch.dtype,
                 grid_scale: torch.dtype | None = None):
    """[(name, dtype, shape)] a module's tensors will have on disk, from its logical [N, K] alone (meta planning).

    grid_scale: the scale dtype where the convention leaves it to the checkpoint (DeepSeek-V4's FP8 grids).
    """
    f, lay = get(fmt), layout(convention, fmt, module)
    held = {"weight": (f.element or src_dtype, f.stored_shape(shape))}
    if f.scale is not None:
        held["scale"] = (f.scale, f.scale_shape(shape))
    if f.has_global_scale:
        held["global_scale"] = held["input_scale"] = (torch.float32, lay.scalar)
    out = []
    for role, name in tensor_names(convention, fmt, module).items():
        dtype, shp = held[role]
        dtype = lay.dtypes.get(role, dtype)
        if dtype is None and grid_scale is None:
            raise ValueError(f"{module}: the {convention} convention stores {fmt} {role} in a dtype each "
                             "checkpoint chooses; pass grid_scale")
        out.append((name, dtype or grid_scale, shp))
    return out


def write_quantized(module: str, qw: QuantizedWeight, convention: str) -> dict[str, torch.Tensor]:
    """QuantizedWeight (multiplier scales) -> {on-disk name: tensor} in the convention's names and directions."""
    f, lay = qw.format, layout(convention, qw.fmt, module)
    names = tensor_names(convention, qw.fmt, module)
    out = {names["weight"]: qw.q}
    if not f.quantized:
        return out
    out[names["scale"]] = qw.scale
    if f.has_global_scale:
        inp = qw.input_scale if qw.input_scale is not None else torch.tensor(DEFAULT_NVFP4_INPUT_SCALE)
        for role, value in (("global_scale", qw.global_scale), ("input_scale", inp)):
            value = value.float().reshape(())
            out[names[role]] = (1.0 / value if role in lay.divisors else value).reshape(lay.scalar)
    return out


def read_quantized(prefix: str, tensors, quantization_config: dict | None) -> QuantizedWeight:
    """Stored tensors of module `prefix` -> QuantizedWeight in dsquant's scale directions.

    Args:
        prefix: module name, e.g. "model.layers.3.mlp.experts.0.gate_proj".
        tensors: a mapping (or anything with `in` and `[]`) from on-disk names to tensors; only this
            module's names are looked up, so a lazy mapping over a checkpoint works.
        quantization_config: config.json's `quantization_config` (or hf_quant_config.json); None for an
            unquantized checkpoint.
    The format is told by which tensors exist, so excluded (BF16) modules read back as fmt "bf16".
    """
    convention = convention_of(quantization_config)
    p = prefix + "."
    if convention == "deepseek" and p + "weight_scale_inv" in tensors:
        return QuantizedWeight("fp8-block", tensors[p + "weight"], tensors[p + "weight_scale_inv"].float())
    if convention == "deepseek" and p + V4_SCALE in tensors:
        return _read_v4(prefix, tensors[p + "weight"], tensors[p + V4_SCALE])
    if convention == "modelopt" and p + "weight_scale_2" in tensors:
        inp = tensors[p + "input_scale"].float().reshape(()) if p + "input_scale" in tensors else None
        return QuantizedWeight("nvfp4", tensors[p + "weight"], tensors[p + "weight_scale"],
                               tensors[p + "weight_scale_2"].float().reshape(()), inp)
    if convention == "compressed-tensors" and p + "weight_packed" in tensors:
        packed, scale = tensors[p + "weight_packed"], tensors[p + "weight_scale"]
        if p + "weight_global_scale" in tensors:
            inp = None
            if p + "input_global_scale" in tensors:
                inp = (1.0 / tensors[p + "input_global_scale"].float()).reshape(())
            glob = (1.0 / tensors[p + "weight_global_scale"].float()).reshape(())
            return QuantizedWeight("nvfp4", packed, scale, glob, inp)
        return QuantizedWeight("mxfp4", packed, scale)
    if convention == "compressed-tensors" and p + "weight_scale" in tensors:
        q, scale = tensors[p + "weight"], tensors[p + "weight_scale"].float()
        if q.dtype == torch.int8:
            return QuantizedWeight("int8", q, scale)
        if q.dtype == torch.float8_e4m3fn and tuple(scale.shape) == (-(-q.shape[0] // 128), -(-q.shape[1] // 128)):
            return QuantizedWeight("fp8-block", q, scale)
        if q.dtype == torch.float8_e4m3fn and (scale.numel() == 1 or tuple(scale.shape) == (q.shape[0], 1)):
            inp = tensors[p + "input_scale"].float().reshape(()) if p + "input_scale" in tensors else None
            return QuantizedWeight("fp8-channel", q, scale.reshape(-1, 1).expand(q.shape[0], 1).contiguous(),
                                   input_scale=inp)
        raise ValueError(f"{prefix}: compressed-tensors weight {q.dtype} {tuple(q.shape)} with scale "
                         f"{tuple(scale.shape)} is neither int8 channel nor fp8 channel, tensor or 128x128 block")
    if p + "weight" not in tensors:
        raise ValueError(f"{prefix}: no tensor {p}weight (nor a packed weight) in the checkpoint")
    w = tensors[p + "weight"]
    if w.element_size() == 1:
        raise ValueError(f"{prefix}: 1-byte weight {w.dtype} without the scale tensors its convention needs")
    return QuantizedWeight("bf16", w)


def _read_v4(prefix: str, w: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    """DeepSeek-V4's `weight` + `scale`: FP8 with a 128x128 grid (E8M0 or F32), or FP4 packed in I8 with E8M0 per 32."""
    if w.dtype == torch.float8_e4m3fn:
        return QuantizedWeight("fp8-block", w, scale.float())
    if w.dtype == torch.int8 and scale.dtype == E8M0_DTYPE:
        return QuantizedWeight("mxfp4", w.view(torch.uint8), e8m0_bytes(scale))
    raise ValueError(f"{prefix}: weight {w.dtype} {tuple(w.shape)} with scale {scale.dtype} {tuple(scale.shape)} is "
                     "neither DeepSeek-V4 FP8 (float8_e4m3fn) nor FP4 (int8 packed, float8_e8m0fnu scales)")
