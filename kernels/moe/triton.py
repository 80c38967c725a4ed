"""Triton entry points of the MoE family; the kernels live beside their wrappers in routing.py, align.py, fused.py."""

from dsquant.kernels.moe.align import moe_align
from dsquant.kernels.moe.fused import fused_moe
from dsquant.kernels.moe.routing import deepseek_route

__all__ = ["deepseek_route", "moe_align", "fused_moe"]
