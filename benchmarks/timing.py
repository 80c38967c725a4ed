"""What every GPU benchmark here shares: the device-copy baseline and the run's identity for its CSV rows."""

from __future__ import annotations

import datetime

import torch
import triton
from triton.testing import do_bench


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written (median of do_bench)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6


def gpu_header() -> dict:
    """Card, torch, Triton and UTC time: the columns every result row carries."""
    return dict(gpu=torch.cuda.get_device_properties(0).name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M"))
