"""compressed-tensors quantization schemes the runner executes, per module: config group -> activation scheme.

Each module follows its own scheme, as compressed-tensors, vLLM and SGLang apply it: the config group whose
targets match the module (`ct_scheme`: `ignore` first, then exact name, `re:`, `Linear`). A checkpoint may mix
W8A8 attention with weight-only (W4A16) experts, so activation quantization is decided per module, never
for the whole checkpoint.

Executed exactly (weights as stored; activations quantized as the scheme says, dsquant.runner.linear):
    weights                               input_activations                        runner act
    float8 block [128, 128]               float8 group 128 dynamic                 fp8_group  (FP8_BLOCK)
    float8 channel | tensor               float8 token dynamic                     fp8_token  (FP8_DYNAMIC)
    float8 channel | tensor               float8 tensor static (input_scale) or    fp8_tensor (FP8)
                                          dynamic
    int8 channel                          int8 token dynamic                       int8_token (W8A8)
    float4 tensor_group 16 (NVFP4)        float4 tensor_group 16 dynamic "local"   nvfp4      (NVFP4)
                                          (input_global_scale)
    float4 group 32 (MXFP4)               float4 group 32 dynamic                  mxfp4      (MXFP4)
    any of the weights above              none                                     none       (weight-only)
Anything else (asymmetric, INT4/INT2 packed, other group sizes, static per-group activations, ...) is refused
with the module and the scheme named.
"""

from __future__ import annotations

from dsquant.check.declared import ct_scheme
from dsquant.formats.registry import get

# (type, num_bits, strategy, group_size or block_structure) of the weights -> stored format they read as.
WEIGHT_SCHEMES = {
    ("float", 8, "block", (128, 128)): "fp8-block",
    ("float", 8, "channel", None): "fp8-channel",
    ("float", 8, "tensor", None): "fp8-channel",
    ("int", 8, "channel", None): "int8",
    ("float", 4, "tensor_group", 16): "nvfp4",
    ("float", 4, "group", 32): "mxfp4",
}
# (type, num_bits, strategy, group_size, dynamic) of the input activations -> runner activation scheme.
ACT_SCHEMES = {
    ("float", 8, "group", 128, True): "fp8_group",
    ("float", 8, "token", None, True): "fp8_token",
    ("float", 8, "tensor", None, True): "fp8_tensor",
    ("float", 8, "tensor", None, False): "fp8_tensor",
    ("int", 8, "token", None, True): "int8_token",
    ("float", 4, "tensor_group", 16, "local"): "nvfp4",
    ("float", 4, "group", 32, True): "mxfp4",
}


def describe(args: dict | None) -> str:
    """A scheme's QuantizationArgs in one phrase, for messages: 'float4 group(32) dynamic=True'."""
    if not args:
        return "none"
    shape = args.get("block_structure") or args.get("group_size")
    sym = "" if args.get("symmetric", True) else " asymmetric"
    return (f"{args.get('type')}{args.get('num_bits')} {args.get('strategy')}"
            f"{f'({shape})' if shape else ''} dynamic={args.get('dynamic')}{sym}")


def _weight_key(w: dict) -> tuple:
    shape = w.get("block_structure") if w.get("strategy") == "block" else w.get("group_size")
    return w.get("type"), w.get("num_bits"), w.get("strategy"), tuple(shape) if isinstance(shape, list) else shape


def activation_scheme(qc: dict, module: str, stored_fmt: str) -> str | None:
    """The runner activation scheme of `module` in a compressed-tensors checkpoint; None when no config group
    quantizes it. ValueError names the module and the scheme when the runner cannot execute it exactly, or
    when the stored tensors are not the format the scheme declares."""
    group = ct_scheme(qc, module)
    if group is None:
        return None
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    scheme = f"weights {describe(weights)}, input_activations {describe(inputs)}"
    fmt = WEIGHT_SCHEMES.get(_weight_key(weights)) if weights.get("symmetric", True) else None
    if fmt is None:
        raise ValueError(f"{module}: compressed-tensors scheme ({scheme}) is not one the runner executes; "
                         f"it runs {', '.join(sorted(set(WEIGHT_SCHEMES.values())))} weights")
    if stored_fmt != fmt:
        raise ValueError(f"{module}: stored as {stored_fmt} but its config group declares {fmt} ({scheme})")
    if not inputs:
        return "none"
    act = None
    if inputs.get("symmetric", True):
        act = ACT_SCHEMES.get((inputs.get("type"), inputs.get("num_bits"), inputs.get("strategy"),
                               inputs.get("group_size"), inputs.get("dynamic")))
    pairs = get(fmt).acts  # the activation schemes engines pair with these weights
    if act not in pairs:
        raise ValueError(f"{module}: compressed-tensors scheme ({scheme}) is not one the runner executes; with "
                         f"{fmt} weights it runs input activations {', '.join(pairs)} or none")
    return act
