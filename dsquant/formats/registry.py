"""Every weight format and every checkpoint convention dsquant knows, one entry each: the one place that names them.

A format's name has one spelling ("fp8-block", never "fp8_block"), the one recipes, the CLI, QuantizedWeight and
the runner use. Code asks an entry for what it needs (`fmt.packed`, `fmt.has_global_scale`, `fmt.kernel_code`,
`fmt.dequantize`) instead of comparing names; a new format or a new on-disk naming is a new entry here. An
entry also says how configs name the format: compressed-tensors' config-group `format` (`ct_format`), ModelOpt's
`quant_algo` (`modelopt_algo`) and DeepSeek-V4's `expert_dtype`; a convention says which `quant_method`
declares it.

In memory every scale multiplies to dequantize (dsquant.formats). On disk a convention names each role's tensor
(`Layout.names`), may store a role as its reciprocal (`Layout.divisors`) and may store a role in another 1-byte
dtype than the one held in memory (`Layout.dtypes`: DeepSeek-V4 keeps FP4 codes as int8 and E8M0 scales as
float8_e8m0fnu, compressed-tensors keeps both as uint8). The module docstring of dsquant.formats.ondisk lists the
resulting tensors per convention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsquant.formats.fp8 import FP8_BLOCK, dequantize_fp8, dequantize_fp8_block, quantize_fp8_block
from dsquant.formats.int8 import dequantize_int8, quantize_int8_per_channel
from dsquant.formats.mxfp4 import E8M0_DTYPE, MXFP4_BLOCK, dequantize_mxfp4, quantize_mxfp4
from dsquant.formats.nvfp4 import NVFP4_BLOCK, dequantize_nvfp4, quantize_nvfp4
from dsquant.kernels import format_codes

ROLES = ("weight", "scale", "global_scale", "input_scale")
# How a runner may execute a weight's activations: none (weight-only), dynamic FP8 per 1x128 group / per token,
# FP8 per tensor (static with an input scale, else dynamic), dynamic INT8 per token, NVFP4 under the input global
# scale, MXFP4.
ACTS = ("none", "fp8_group", "fp8_token", "fp8_tensor", "int8_token", "nvfp4", "mxfp4")


@dataclass(frozen=True)
class Format:
    """One weight format, as held in memory (dsquant.formats' arrays, every scale a multiplier).

    element: dtype of the stored codes (None: the source's float dtype, bf16 = not quantized).
    scale: dtype of the block scales in memory (None: no scales).
    block: (rows, cols) of the weight one scale covers; cols 0 = the whole row (per-channel); None = no scales.
    pack: codes per stored element along K (2 for E2M1 pairs, even K index in the low nibble).
    has_global_scale: a float32 [] weight global scale multiplies the block scales (and a static activation
        global scale may come with it).
    kernel_code: the dsquant.kernels.format_codes code of the weight format (the kernels' FMT / W_FMT constexpr).
    act: the activation scheme (ACTS) a runner executes the format with by default.
    acts: the activation schemes serving engines pair with the format's kernels (they run no other combination;
        "none", weight-only, goes with any).
    fused_moe_act: the activation scheme dsquant.kernels.moe.fused_moe runs experts of this format with, None
        where the runner loops over experts instead (NVFP4: W4A4, given the experts' static input scales).
    quantize: reference quantizer w [N, K] -> (q, scale[, global_scale]) (dsquant.formats), None for bf16.
    dequantize: (q, scale, global_scale, dtype) -> dense [N, K].
    ct_format: the `format` of a compressed-tensors config group holding it (None: not a compressed-tensors
        format).
    modelopt_algo: ModelOpt's `quant_algo` for it (hf_quant_config.json, `moe_quant_algo`), None where ModelOpt
        has none dsquant writes.
    expert_dtype: DeepSeek-V4's config.json `expert_dtype` under which engines build routed experts of this
        format, None where V4 engines build none.
    """

    name: str
    element: torch.dtype | None
    scale: torch.dtype | None
    block: tuple[int, int] | None
    pack: int
    has_global_scale: bool
    kernel_code: int | None
    act: str
    acts: tuple[str, ...]
    fused_moe_act: str | None
    quantize: Callable | None
    dequantize: Callable = field(repr=False)
    ct_format: str | None = None
    modelopt_algo: str | None = None
    expert_dtype: str | None = None

    @property
    def quantized(self) -> bool:
        return self.element is not None

    @property
    def packed(self) -> bool:
        return self.pack > 1

    @property
    def per_channel(self) -> bool:
        """One scale per output row ([N, 1])."""
        return self.block == (1, 0)

    @property
    def block_grid(self) -> bool:
        """One scale per 2-D block of rows and columns (DeepSeek's 128x128 grid)."""
        return self.block is not None and self.block[0] > 1

    def logical_shape(self, stored: tuple[int, int]) -> tuple[int, int]:
        """[N, K] of the weight from the shape of its stored codes."""
        n, k = stored
        return n, k * self.pack

    def stored_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        n, k = shape
        return n, k // self.pack

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the block scales of a [N, K] weight."""
        n, k = shape
        rows, cols = self.block
        return -(-n // rows), (-(-k // cols) if cols else 1)


# fmt: off
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", element=None, scale=None, block=None, pack=1, has_global_scale=False,
           kernel_code=format_codes.BF16, act="none", acts=(), fused_moe_act="none", quantize=None,
           dequantize=lambda q, s, g, dtype: q.to(dtype)),
    Format("fp8-block", element=torch.float8_e4m3fn, scale=torch.float32, block=(FP8_BLOCK, FP8_BLOCK), pack=1,
           has_global_scale=False, kernel_code=format_codes.FP8_BLOCK, act="fp8_group", acts=("fp8_group",),
           fused_moe_act="fp8_group",
           quantize=quantize_fp8_block, dequantize=lambda q, s, g, dtype: dequantize_fp8_block(q, s, dtype=dtype),
           ct_format="float-quantized", expert_dtype="fp8"),
    # compressed-tensors' FP8 per channel or per tensor (llm-compressor's presets): read, never written
    Format("fp8-channel", element=torch.float8_e4m3fn, scale=torch.float32, block=(1, 0), pack=1,
           has_global_scale=False, kernel_code=None, act="fp8_token", acts=("fp8_token", "fp8_tensor"),
           fused_moe_act=None, quantize=None,
           dequantize=lambda q, s, g, dtype: dequantize_fp8(q, s, dtype), ct_format="float-quantized"),
    Format("int8", element=torch.int8, scale=torch.float32, block=(1, 0), pack=1, has_global_scale=False,
           kernel_code=format_codes.INT8, act="int8_token", acts=("int8_token",), fused_moe_act="int8_token",
           quantize=quantize_int8_per_channel, dequantize=lambda q, s, g, dtype: dequantize_int8(q, s, dtype),
           ct_format="int-quantized"),
    Format("nvfp4", element=torch.uint8, scale=torch.float8_e4m3fn, block=(1, NVFP4_BLOCK), pack=2,
           has_global_scale=True, kernel_code=format_codes.NVFP4, act="nvfp4", acts=("nvfp4",), fused_moe_act="nvfp4",
           quantize=quantize_nvfp4, dequantize=lambda q, s, g, dtype: dequantize_nvfp4(q, s, g, dtype=dtype),
           ct_format="nvfp4-pack-quantized", modelopt_algo="NVFP4", expert_dtype="fp4"),
    Format("mxfp4", element=torch.uint8, scale=torch.uint8, block=(1, MXFP4_BLOCK), pack=2, has_global_scale=False,
           kernel_code=format_codes.MXFP4, act="none", acts=("mxfp4",), fused_moe_act="none",
           quantize=quantize_mxfp4, dequantize=lambda q, s, g, dtype: dequantize_mxfp4(q, s, dtype=dtype),
           ct_format="mxfp4-pack-quantized", expert_dtype="fp4"),
)}
# fmt: on


def get(name: str) -> Format:
    """The entry of format `name` (ValueError listing the known names)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {tuple(FORMATS)}") from None


def find(label: str | None) -> Format | None:
    """The entry of `label` when it names a format, else None (labels such as check.names.module_format's
    "fp8-tensor" or a dtype name describe what a checkpoint stores, not always a format dsquant handles)."""
    return FORMATS.get(label) if label else None


def of_kernel_code(code: int) -> Format:
    """The entry whose weights the kernels know by format_codes `code`."""
    for f in FORMATS.values():
        if f.kernel_code == code:
            return f
    raise ValueError(f"no format has kernel code {code}")


# ------------------------------------------------------------------------------------------------ conventions


@dataclass(frozen=True)
class Layout:
    """How one convention stores one format's tensors for module M: `M.<names[role]>`.

    dtypes: stored dtype per role where it differs from the in-memory one (the same bytes, viewed); None for a
        role whose dtype each checkpoint chooses (DeepSeek-V4's FP8 grids: E8M0 in instruct, float32 in Base).
    divisors: roles stored as the reciprocal of the in-memory multiplier.
    scalar: shape of the stored global and input scales.
    """

    names: dict[str, str]
    dtypes: dict[str, torch.dtype | None] = field(default_factory=dict)
    divisors: tuple[str, ...] = ()
    scalar: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Convention:
    """One checkpoint convention: how config.json declares it and how it names each format's tensors.

    quant_method: config.json's `quant_method` that declares it (a prefix where `prefix`, as ModelOpt's
        "modelopt" and "modelopt_fp4").
    v4: True where the quant_method means this convention only for DeepSeek-V4 models, False only for the
        others (both declare "fp8"), None for any model.
    label: how `dsquant inspect` names it.
    """

    name: str
    quant_method: str
    layouts: dict[str, Layout]
    prefix: bool = False
    v4: bool | None = None
    label: str = ""

    def declared_by(self, method: str, v4: bool) -> bool:
        if self.v4 is not None and self.v4 != v4:
            return False
        return method.startswith(self.quant_method) if self.prefix else method == self.quant_method


# fmt: off
_BF16 = Layout({"weight": "weight"})
_MODELOPT_NVFP4 = Layout({"weight": "weight", "scale": "weight_scale", "global_scale": "weight_scale_2",
                          "input_scale": "input_scale"}, scalar=())

CONVENTIONS: dict[str, Convention] = {c.name: c for c in (
    # DeepSeek's own FP8 release (`quant_method: fp8`); weight_scale_inv multiplies despite its name
    Convention("deepseek", "fp8", {"bf16": _BF16,
                            "fp8-block": Layout({"weight": "weight", "scale": "weight_scale_inv"})},
               v4=False, label="deepseek-fp8"),
    # NVIDIA ModelOpt (`quant_method: modelopt`, or hf_quant_config.json)
    Convention("modelopt", "modelopt", {"bf16": _BF16, "nvfp4": _MODELOPT_NVFP4}, prefix=True, label="modelopt"),
    Convention("compressed-tensors", "compressed-tensors", label="compressed-tensors", layouts={
        "bf16": _BF16,
        "fp8-block": Layout({"weight": "weight", "scale": "weight_scale"}),
        "int8": Layout({"weight": "weight", "scale": "weight_scale"}),
        "nvfp4": Layout({"weight": "weight_packed", "scale": "weight_scale", "global_scale": "weight_global_scale",
                         "input_scale": "input_global_scale"}, divisors=("global_scale", "input_scale")),
        "mxfp4": Layout({"weight": "weight_packed", "scale": "weight_scale"}),
    }),
    # DeepSeek-V4's official names (no `model.` prefix); NVIDIA's V4 release keeps ModelOpt's NVFP4 experts
    Convention("deepseek-v4", "fp8", v4=True, label="deepseek-v4-fp8", layouts={
        "bf16": _BF16,
        "fp8-block": Layout({"weight": "weight", "scale": "scale"}, dtypes={"scale": None}),
        "mxfp4": Layout({"weight": "weight", "scale": "scale"}, dtypes={"weight": torch.int8, "scale": E8M0_DTYPE}),
        "nvfp4": _MODELOPT_NVFP4,
    }),
)}
# fmt: on
# Which conventions can hold each format (bf16 = excluded, every convention holds it).
FORMAT_CONVENTIONS = {f: tuple(c.name for c in CONVENTIONS.values() if f in c.layouts) for f in FORMATS}
FORMAT_CONVENTIONS = {f: cs for f, cs in FORMAT_CONVENTIONS.items() if cs}


def layout(convention: str, fmt: str, module: str = "") -> Layout:
    """The Layout of `fmt` in `convention` (ValueError naming the module when the convention cannot hold it)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {tuple(CONVENTIONS)}")
    found = CONVENTIONS[convention].layouts.get(fmt)
    if found is None:
        raise ValueError(
            f"{module}: format {fmt!r} cannot be stored in the {convention} convention; "
            f"{fmt} fits {FORMAT_CONVENTIONS.get(fmt, ())}"
        )
    return found


def convention_of(quantization_config: dict | None, strict: bool = True, v4: bool = False) -> str | None:
    """quantization_config (config.json's, or hf_quant_config.json's nested form) -> convention; None when
    unquantized, or (strict=False) when it declares a quant_method dsquant does not read.

    v4: the model is DeepSeek-V4 (checkpoint.names_v4.is_v4), whose `quant_method: fp8` means deepseek-v4."""
    if not quantization_config:
        return None
    if "quantization" in quantization_config and "quant_method" not in quantization_config:
        return "modelopt"  # hf_quant_config.json nested form
    method = str(quantization_config.get("quant_method", ""))
    for convention in CONVENTIONS.values():
        if convention.declared_by(method, v4):
            return convention.name
    if not strict:
        return None
    raise ValueError(
        f"quantization_config quant_method {method!r} is not one dsquant reads; "
        f"readable: fp8 (DeepSeek native), modelopt, compressed-tensors"
    )


# Parameter names that tell by themselves which convention stored a module, the most telling first:
# compressed-tensors' own names, ModelOpt's second-level scale, DeepSeek's inverse-named scale, then the
# weight_scale that compressed-tensors (and SGLang's w8a8_int8) write. DeepSeek-V4's `scale` is not one: only
# the model config tells that release's names apart.
MODULE_MARKS = (
    ("weight_packed", "compressed-tensors"),
    ("weight_global_scale", "compressed-tensors"),
    ("input_global_scale", "compressed-tensors"),
    ("weight_scale_2", "modelopt"),
    ("weight_scale_inv", "deepseek"),
    ("weight_scale", "compressed-tensors"),
)


def convention_of_module(params) -> str | None:
    """The convention whose names a module's parameters (the names after `<module>.`) carry; None for an
    unquantized module."""
    return next((convention for name, convention in MODULE_MARKS if name in params), None)
