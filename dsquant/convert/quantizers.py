"""The four weight quantizers `convert` calls, picked once per device, all with the format references' signatures.

    fp8_block(w, *, ue8m0, name) -> (q, scale)          as dsquant.formats.quantize_fp8_block
    int8_rows(x, *, name) -> (q, scale)                  as dsquant.formats.quantize_int8_per_token
    nvfp4(x, global_scale, *, name) -> (packed, block_scale, global_scale)   as dsquant.formats.quantize_nvfp4
    mxfp4(x, *, scale_rule, name) -> (packed, scale)     as dsquant.formats.quantize_mxfp4

Three implementations give the same bytes: "reference" (dsquant.formats, the spec), "cpu" (cpuquant: the same
numbers in fewer torch passes) and "triton" (dsquant.kernels.quant on CUDA). Every one raises ValueError naming
the tensor on NaN/Inf input; the Triton kernels do not look (a host sync per launch), so a check runs first.
tests/checkpoint/test_cpuquant.py converts every recipe x synthetic source with "cpu" and "reference" and
compares the output files.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsquant.convert import cpuquant
from dsquant.formats import fp8, int8, mxfp4, nvfp4
from dsquant.formats._checks import check_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quantizers:
    kind: str  # "reference" | "cpu" | "triton"
    fp8_block: Callable
    int8_rows: Callable
    nvfp4: Callable
    mxfp4: Callable


REFERENCE = Quantizers(
    "reference", fp8.quantize_fp8_block, int8.quantize_int8_per_token, nvfp4.quantize_nvfp4, mxfp4.quantize_mxfp4
)
CPU = Quantizers(
    "cpu",
    cpuquant.quantize_fp8_block,
    cpuquant.quantize_int8_per_token,
    cpuquant.quantize_nvfp4,
    cpuquant.quantize_mxfp4,
)


def _checked(kernel: Callable) -> Callable:
    """A Triton quantizer with the references' `name=` and NaN/Inf check."""

    @functools.wraps(kernel)
    def call(x: torch.Tensor, *args, name: str = "tensor", **kwargs):
        check_finite(x, name)
        return kernel(x, *args, **kwargs)

    return call


def _triton() -> Quantizers | None:
    try:
        from dsquant.kernels import quant as k

        return Quantizers(
            "triton",
            *(
                _checked(f)
                for f in (k.quantize_fp8_block, k.quantize_int8_per_token, k.quantize_nvfp4, k.quantize_mxfp4)
            ),
        )
    except (ImportError, AttributeError) as e:
        log.warning("dsquant.kernels.quant is not importable (%s); using the format references", e)
        return None


def select_quantizers(device: torch.device) -> Quantizers:
    """Triton on CUDA (the references there when Triton is missing), cpuquant on the CPU, else the references."""
    if device.type == "cuda":
        return _triton() or REFERENCE
    return CPU if device.type == "cpu" else REFERENCE
