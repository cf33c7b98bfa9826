"""What a run trains, printed before step 1: trainable parameters by group and the mixer in use.

A MoSLoRA run that silently trains plain LoRA (the mixer frozen, or never created) looks like any
other run in its loss curve; this summary makes the difference visible in the first lines of the log.
"""

from __future__ import annotations

from collections import Counter

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import nn

from ..moslora import mixer_options_of
from ..probes import full_numel, is_4bit

GROUPS = ("llm adapter", "llm mixers", "vit adapter", "vit mixers", "projector", "other")


def param_group(name: str) -> str:
    """Which of GROUPS a LLaVAModel parameter name belongs to."""
    tower = (
        "llm" if name.startswith("llm.") else "vit" if name.startswith("visual_encoder.") else None
    )
    if tower and "lora_mixer" in name:
        return f"{tower} mixers"
    if tower and "lora_" in name:
        return f"{tower} adapter"
    return "projector" if name.startswith("projector.") else "other"


def trainable_by_group(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts of a LLaVAModel, by GROUPS (zero groups included)."""
    counts = Counter({group: 0 for group in GROUPS})
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[param_group(name)] += full_numel(param)
    return dict(counts)


def adapter_kind(tower: nn.Module) -> str:
    """'MoSLoRA (mixer kaiming, learned)', 'LoRA', ... for a PEFT-wrapped tower, else 'none'."""
    configs = getattr(tower, "peft_config", None)
    if not configs:
        return "none"
    config = configs[getattr(tower, "active_adapter", "default")]
    options = mixer_options_of(config)
    if options is None:
        return "DoRA" if getattr(config, "use_dora", False) else "LoRA"
    if options.init_only:
        return f"init-only control (mixer {options.init} folded into A, then frozen identity)"
    state = "learned" if options.learnable else "frozen"
    return f"MoSLoRA (mixer {options.init}, {state}), r={config.r}, alpha={config.lora_alpha}"


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def base_weights(tower: nn.Module) -> str:
    """How the frozen base weights of a tower are stored: '4-bit NF4, double quant, ...' or a dtype.

    For 4-bit bases the storage dtype is read off the packed weights themselves, so the line shows
    what XTuner actually built: under ZeRO-3 its LLaVAModel switches `bnb_4bit_quant_storage` to a
    half dtype so that DeepSpeed can partition the packed weights like any other parameter.
    """
    packed = [m.weight for m in tower.modules() if is_4bit(m)]
    if not packed:
        dtypes = sorted({_dtype_name(p.dtype) for p in tower.parameters() if not p.requires_grad})
        return ", ".join(dtypes) or "no frozen weights"
    quant = getattr(getattr(tower, "config", None), "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant or {})
    kind = str(quant.get("bnb_4bit_quant_type", "4-bit")).upper()
    double = ", double quant" if quant.get("bnb_4bit_use_double_quant") else ""
    compute = _dtype_name(quant.get("bnb_4bit_compute_dtype", "?"))
    storage = _dtype_name(packed[0].dtype)
    return f"4-bit {kind}{double}, storage {storage}, compute {compute} ({len(packed)} layers)"


def summary_lines(model: nn.Module) -> list[str]:
    counts = trainable_by_group(model)
    total = sum(counts.values())
    lines = ["Trainable parameters by group:"]
    lines += [f"  {group:<12} {counts[group]:>14,}" for group in GROUPS]
    lines.append(f"  {'total':<12} {total:>14,}")
    for label, attr in (("LLM", "llm"), ("ViT", "visual_encoder")):
        tower = getattr(model, attr, None)
        if tower is not None:
            lines.append(f"{label} adapter: {adapter_kind(tower)}")
            lines.append(f"{label} base weights: {base_weights(tower)}")
    return lines


class AdapterSummaryHook(Hook):
    """Logs `summary_lines` once, before the first training step."""

    priority = "VERY_LOW"

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        for line in summary_lines(model):
            print_log(line, logger="current")
