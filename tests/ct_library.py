"""Checkpoints whose quantized tensors and config compressed-tensors itself writes (what llm-compressor saves
for a preset), built from a synthetic BF16 DeepSeek checkpoint, for tests that read what dsquant did not write."""

from __future__ import annotations

import json
import shutil

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file

from dsquant.checkpoint.reader import Checkpoint

# A static per-tensor activation scale for the FP8 preset (what calibration would store; any positive value).
STATIC_INPUT_SCALE = 0.004


def library_checkpoint(src, dst, preset: str):
    """A compressed-tensors checkpoint of `src` (BF16) in the library preset `preset` (FP8 family): every
    projection of the decoder layers quantized and packed by the library's own compressor, its config the
    library's QuantizationConfig dump, lm_head ignored, no MTP layer."""
    shutil.copytree(src, dst)
    ckpt = Checkpoint(dst)
    # transformers builds no MTP layer, so llm-compressor's output has none
    mtp = f"model.layers.{ckpt.config['num_hidden_layers']}."
    scheme = preset_name_to_scheme(preset, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    tensors = {}
    for name in ckpt.infos:
        if name.startswith(mtp):
            continue
        t = ckpt.get(name)
        module = name[: -len(".weight")]
        if not (name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and t.ndim == 2):
            tensors[name] = t
            continue
        dims = 1 if scheme.weights.strategy == "channel" else None
        mn = t.amin(dim=dims, keepdim=True) if dims else t.amin()
        mx = t.amax(dim=dims, keepdim=True) if dims else t.amax()
        scale, zp = calculate_qparams(mn, mx, scheme.weights)
        local = compressor.compress({"weight": t, "weight_scale": scale, "weight_zero_point": zp}, scheme)
        if not scheme.input_activations.dynamic:
            local["input_scale"] = torch.tensor([STATIC_INPUT_SCALE], dtype=t.dtype)
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in local.items()})
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, quantization_status="compressed",
                            format="float-quantized", ignore=["lm_head"])
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors",
                                     **qc.model_dump(mode="json", exclude=["quant_method"])}
    (dst / "config.json").write_text(json.dumps(config))
    return dst
