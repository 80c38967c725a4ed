"""Process one output shard: read each planned module, (de)quantize it in row chunks, stream it to disk.

Tensors are handled in chunks of whole 128-row blocks (about `CHUNK_BYTES` of float32), so the working set
stays in cache; memory holds at most one source tensor's stored bytes, one module's outputs and
`MAX_PENDING_WRITES` tensors waiting for the writer, per worker. Every
format in dsquant is row-local (FP8 128x128 blocks, per-row INT8, per-16/32 FP4 blocks along K) except the
NVFP4 global scale, which is found first from the tensor amax (the max over fused partners) and then
passed to each chunk. Chunking therefore gives results bit-identical to quantizing the whole tensor.

The quantizers (quantizers.py) are picked per device and share the format references' signatures.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from dsquant.checkpoint.manifest import Manifest
from dsquant.checkpoint.names import FP8_SCALE_SUFFIX
from dsquant.checkpoint.reader import Checkpoint
from dsquant.checkpoint.writer import ShardWriter
from dsquant.convert import v4
from dsquant.convert.plan import ModuleJob, ShardJob
from dsquant.convert.quantizers import Quantizers
from dsquant.devices import current_device
from dsquant.formats import nvfp4
from dsquant.formats.fp8 import FP8_BLOCK, dequantize_fp8_block
from dsquant.formats.ondisk import write_quantized
from dsquant.formats.registry import find, get
from dsquant.formats.weight import QuantizedWeight

log = logging.getLogger(__name__)

# performance hyper-parameters: float32 bytes per chunk; 4 MiB keeps a chunk and its temporaries in L2/L3
# (2-core CPU host, a 2048x7168 BF16 expert: the FP8-block reference ran at 40 MB/s on the whole tensor and
# 95 MB/s in 128-row chunks; NVFP4 13 vs 18 MB/s).
CHUNK_BYTES = 4 << 20
# On a GPU a chunk is the whole tensor (up to 1 GiB of float32): per-chunk launches, host<->device copies and
# syncs dominated 128-row chunks, and device memory holds a whole DeepSeek tensor with room to spare.
CHUNK_BYTES_CUDA = 1 << 30
MAX_PENDING_WRITES = 4


def chunk_rows(k: int, device: torch.device | str = "cpu") -> int:
    budget = CHUNK_BYTES_CUDA if torch.device(device).type == "cuda" else CHUNK_BYTES
    return max(FP8_BLOCK, (budget // 4 // max(k, 1)) // FP8_BLOCK * FP8_BLOCK)


def _read_rows(ckpt: Checkpoint, weight: str, r0: int, r1: int, fp8_source: bool):
    """Stored rows [r0, r1) of a source weight (and of its FP8 block scales), read in the calling thread."""
    q = ckpt.rows(weight, r0, r1)
    if not fp8_source:
        return q, None
    return q, ckpt.rows(weight + FP8_SCALE_SUFFIX, r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK))


def _as_float(q: torch.Tensor, scale: torch.Tensor | None, device, keep_bf16: bool = False) -> torch.Tensor:
    """Stored rows -> float32 on device (FP8 sources dequantized block by block); BF16 rows stay BF16 with
    keep_bf16 (the CPU quantizers widen them inside their loops, exactly)."""
    q = q.to(device, non_blocking=True)
    if scale is None:
        return q if keep_bf16 and q.dtype == torch.bfloat16 else q.float()
    return dequantize_fp8_block(q, scale.to(device), dtype=torch.float32)


def _chunks(n: int, k: int, device):
    step = chunk_rows(k, device)
    return [(r0, min(r0 + step, n)) for r0 in range(0, n, step)]


def _map_chunks(ckpt: Checkpoint, weight: str, fp8_source: bool, fn, pool, device):
    """fn(stored rows, scale rows) for each row chunk, in order; reads stay in this thread (its file handles),
    the arithmetic runs on `pool` threads when given (torch releases the GIL)."""
    n, k = ckpt.infos[weight].shape
    loaded = [_read_rows(ckpt, weight, r0, r1, fp8_source) for r0, r1 in _chunks(n, k, device)]
    if pool is None:
        return [fn(q, s) for q, s in loaded]
    return [f.result() for f in [pool.submit(fn, q, s) for q, s in loaded]]


def _amax(ckpt: Checkpoint, job: ModuleJob, device, pool, loaded: torch.Tensor | None = None) -> torch.Tensor:
    if loaded is not None:
        return loaded.abs().amax().float()
    parts = _map_chunks(ckpt, job.module + ".weight", job.fp8_source,
                        lambda q, s: _as_float(q, s, device, keep_bf16=True).abs().amax().float(), pool, device)
    return torch.stack(parts).amax()


def _load_on_gpu(ckpt: Checkpoint, job: ModuleJob, device) -> torch.Tensor | None:
    """The whole weight as float32 on a GPU, read once for both the NVFP4 amax and the quantize pass (None on
    the CPU, where row chunks keep the working set in cache and the source is read twice instead)."""
    if device.type != "cuda":
        return None
    weight = job.module + ".weight"
    return _as_float(*_read_rows(ckpt, weight, 0, ckpt.infos[weight].shape[0], job.fp8_source), device)


def _quantize_job(ckpt, job: ModuleJob, qz: Quantizers, device, global_scale, input_scale, pool,
                  loaded: torch.Tensor | None = None) -> QuantizedWeight:
    weight = job.module + ".weight"
    rule, fmt = job.rule, job.fmt
    # each format's quantizer with the recipe options it takes (recipe._FORMAT_OPTIONS); every path checks its
    # input for NaN/Inf and names the tensor (convert.quantizers)
    quantize = {"fp8-block": lambda x: qz.fp8_block(x, ue8m0=rule.ue8m0, name=weight),
                "int8": lambda x: qz.int8_rows(x, name=weight),
                "nvfp4": lambda x: qz.nvfp4(x, global_scale, name=weight),
                "mxfp4": lambda x: qz.mxfp4(x, scale_rule=rule.scale_rule, name=weight)}[fmt]

    def chunk(q, s, x=None):
        x = _as_float(q, s, device, keep_bf16=qz.kind == "cpu") if x is None else x
        out = quantize(x)
        return out[0].cpu(), out[1].cpu()

    if loaded is not None:
        parts = [chunk(None, None, loaded)]
    else:
        parts = _map_chunks(ckpt, weight, job.fp8_source, chunk, pool, device)
    q, s = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if not get(fmt).has_global_scale:
        return QuantizedWeight(fmt, q, s)
    return QuantizedWeight(fmt, q, s, global_scale.cpu(), input_scale)


def process_item(ckpt: Checkpoint, item: list[ModuleJob], convention: str, qz: Quantizers, device,
                 calibration: dict[str, float] | None, pool=None, stats: dict | None = None):
    """Yield (output name, tensor or raw bytes) for one fused group / module, in planned output order.
    DeepSeek-V4 jobs go to v4, which adds what it measured to `stats`."""
    if any(job.action in v4.ACTIONS for job in item):
        yield from v4.process_item(ckpt, item, qz, device, calibration, {} if stats is None else stats)
        return
    global_scale = input_scale = None
    loaded: dict[str, torch.Tensor | None] = {}
    shared = find(item[0].fmt)
    if shared is not None and shared.has_global_scale:
        loaded = {job.module: _load_on_gpu(ckpt, job, device) for job in item if job.action == "quant"}
        # Fused partners share one weight global scale and one activation scale (formats.md section 8 item 4).
        amax = torch.stack([_amax(ckpt, job, device, pool, loaded.get(job.module)).cpu() for job in item]).amax()
        # On the CPU: torch on CUDA divides by a scalar through its reciprocal, which can move the last bit.
        global_scale = nvfp4.nvfp4_global_scale(amax).to(device)
        scales = [calibration[j.module] for j in item if calibration and j.module in calibration]
        input_scale = torch.tensor(max(scales) if scales else item[0].rule.input_scale, dtype=torch.float32)
    for job in item:
        if job.action == "copy":
            for name, _, _ in job.outputs:
                yield name, ckpt.raw(name)
        elif job.action == "dequant":
            for name, _, _ in job.outputs:
                if name + FP8_SCALE_SUFFIX in ckpt.infos:
                    parts = _map_chunks(ckpt, name, True,
                                        lambda q, s: _as_float(q, s, device).to(torch.bfloat16).cpu(), pool, device)
                    yield name, torch.cat(parts)
                else:
                    yield name, ckpt.raw(name)
        else:
            qw = _quantize_job(ckpt, job, qz, device, global_scale, input_scale, pool, loaded.pop(job.module, None))
            out = write_quantized(job.module, qw, convention)
            for name, _, _ in job.outputs:
                yield name, out[name]


def write_shard(ckpt: Checkpoint, shard: ShardJob, dst, convention: str, qz: Quantizers, device,
                calibration, manifest: Manifest, progress, pool=None) -> int:
    """Write one output shard atomically, record it in the manifest; returns the source bytes processed.

    Writing and checksumming run on their own thread, overlapped with the next module's arithmetic; at most
    `MAX_PENDING_WRITES` tensors wait for it, which bounds the memory this adds.
    """
    writer = ShardWriter(dst / shard.file, shard.entries)
    done, pending, stats = 0, [], {}
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsquant-write")
    try:
        with current_device(device):
            for item in shard.items:
                for name, data in process_item(ckpt, item, convention, qz, device, calibration, pool, stats):
                    pending.append(io.submit(writer.write, name, data))
                    while len(pending) > MAX_PENDING_WRITES:
                        pending.pop(0).result()
                n = sum(ckpt.infos[s].nbytes for job in item for s in job.sources)
                done += n
                if progress is not None:
                    progress.update(n)
        for f in pending:
            f.result()
        sha = writer.commit()
    except BaseException:
        io.shutdown(wait=True, cancel_futures=True)
        writer.abort()
        raise
    finally:
        io.shutdown(wait=True)
        ckpt.close()  # unmap this thread's source files: touched pages would otherwise stay in RSS
    manifest.record(shard.file, writer.bytes_written, sha, stats)
    return done
