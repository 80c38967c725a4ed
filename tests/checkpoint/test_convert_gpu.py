"""On a CUDA GPU, `--device cuda` (Triton quantizers where they exist) writes the same bytes as the CPU path."""

from __future__ import annotations

import pytest
import torch

from dsquant.convert import convert


def _cpu_and_gpu_write_the_same_bytes(src, tmp_path, recipe, convention):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = convert(src, tmp_path / "cpu", recipe, convention=convention, max_shard_size="2MB", progress=False)
    gpu = convert(src, tmp_path / "gpu", recipe, convention=convention, device="cuda", max_shard_size="2MB",
                  progress=False)
    assert gpu.quantizers in ("triton", "reference") and cpu.shards == gpu.shards
    for shard in sorted((tmp_path / "cpu").glob("model-*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "gpu" / shard.name).read_bytes(), f"{recipe}: {shard.name} differs"


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["bf16", "fp8"])
@pytest.mark.parametrize("recipe,convention", [("fp8-block", "deepseek"), ("fp8-block-ue8m0", "deepseek"),
                                               ("int8", "compressed-tensors"), ("nvfp4", "modelopt"),
                                               ("nvfp4", "compressed-tensors"), ("mxfp4", "compressed-tensors")])
def test_cuda_conversion_is_byte_identical_to_cpu(synth, tmp_path, source, recipe, convention):
    _cpu_and_gpu_write_the_same_bytes(synth("v3", source), tmp_path, recipe, convention)


@pytest.mark.gpu
@pytest.mark.parametrize("variant,recipe", [("flash", "fp8-block"), ("flash-0731", "nvfp4"), ("flash-base", "nvfp4"),
                                            ("flash-base", "mxfp4")])
def test_cuda_v4_conversion_is_byte_identical_to_cpu(synth_v4, tmp_path, variant, recipe):
    """DeepSeek-V4: transcoded experts, and -Base experts quantized by the Triton kernels."""
    _cpu_and_gpu_write_the_same_bytes(synth_v4(variant), tmp_path, recipe, "auto")
