"""Merging a (Q)MoSLoRA model into plain weights.

For a full-precision base, PEFT's own `merge_and_unload()` runs the MoSLoRA maths (see layers.py).
For a 4-bit base, `merge_and_unload()` requantizes W0 + ΔW to NF4, which rounds the small ΔW away
(PEFT warns about it). `merge_and_unload_dequantized` instead dequantizes W0 and adds ΔW in
float32, giving an ordinary fp16/bf16 model: what an exported QMoSLoRA model should be.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from ..probes import is_4bit


def _dense_copy(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear with `weight` (out, in) and the bias of `layer`, in `dtype`."""
    bias = getattr(layer, "bias", None)
    dense = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def merge_and_unload_dequantized(
    peft_model: PeftModel, dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """Merge every active adapter into a dequantized `dtype` copy of the base weights; unwrap.

    Works in place on `peft_model` (like `merge_and_unload`) and returns the plain base model, with
    every bitsandbytes 4-bit layer turned into an `nn.Linear` and the quantization config removed,
    so `save_pretrained` writes an ordinary checkpoint.
    """
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):  # nn.Linear covers bnb Linear4bit too
            raise TypeError(
                f"`merge_and_unload_dequantized` merges linear layers only, found {type(base).__name__}."
            )
        weight = dequantize_module_weight(base).float()  # (out, in)
        for adapter in module.active_adapters:
            if adapter in module.lora_A and adapter not in module.merged_adapters:
                delta = module.get_delta_weight(adapter).float()
                if module.use_dora.get(adapter, False):
                    # DoRA rescales each output row of W + ΔW to its learned magnitude, as PEFT's
                    # own merge does: W' = m / ||W + ΔW||_row * (W + ΔW).
                    magnitude = module.lora_magnitude_vector[adapter].weight.float()
                    norm = torch.linalg.norm(weight + delta, dim=1)
                    weight = (magnitude / norm).view(-1, 1) * (weight + delta)
                else:
                    weight = weight + delta
        module.base_layer = _dense_copy(base, weight, dtype)
        module.merged_adapters = []
    model = peft_model.unload()

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_4bit(child):
                setattr(
                    parent, name, _dense_copy(child, dequantize_module_weight(child).float(), dtype)
                )
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if config is not None and hasattr(config, attr):
            delattr(config, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model.to(dtype)
