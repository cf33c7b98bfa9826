"""What a run trains, printed before step 1: trainable parameters by group and the mixer in use.

A MoSLoRA run that silently trains plain LoRA (the mixer frozen, or never created) looks like any
other run in its loss curve; this summary makes the difference visible in the first lines of the log.
It also names trainable tensors that can never learn: those of vision-encoder layers computed
after the hidden state LLaVA reads (`visual_select_layer`; llava_moslora/builders/vision_layers.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import nn

from ..builders.vision_layers import layers_above, selected_index
from ..moslora import mixer_options_of
from ..moslora.kinds import kind_of
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
    """'MoSLoRA (mixer kaiming, learned), r=64, alpha=128', 'LoRA, r=64, alpha=128', ... for a
    PEFT-wrapped tower, else 'none'."""
    configs = getattr(tower, "peft_config", None)
    if not configs:
        return "none"
    config = configs[getattr(tower, "active_adapter", "default")]
    options, label = mixer_options_of(config), kind_of(config).label
    size = f"r={config.r}, alpha={config.lora_alpha}"
    if options is None:
        return f"{label}, {size}"
    if options.init_only:
        return f"{label} (mixer {options.init} folded into A, then frozen identity), {size}"
    state = "learned" if options.learnable else "frozen"
    return f"{label} (mixer {options.init}, {state}), {size}"


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


@dataclass
class Unreachable:
    """Trainable tensors of the vision encoder's layers above the hidden state LLaVA reads."""

    select_layer: int  # the model's visual_select_layer
    num_layers: int  # the encoder's
    layers: list[int]  # the encoder layers above the selected hidden state
    # (layer, name inside the layer, numel), e.g. (23, "self_attn.q_proj.lora_A.default.weight", n)
    tensors: list[tuple[int, str, int]] = field(default_factory=list)


def _encoder_layers(tower: nn.Module) -> tuple[str, int] | None:
    """(dotted name, count) of the tower's encoder layers: the ModuleList as long as its config's
    `num_hidden_layers` (CLIP: `vision_model.encoder.layers`), found by structure, not by name."""
    count = getattr(getattr(tower, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        return None
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, count
    return None


def unreachable_parameters(model: nn.Module) -> Unreachable | None:
    """What of a LLaVAModel's vision encoder cannot receive a gradient; None if not a LLaVA."""
    tower = getattr(model, "visual_encoder", None)
    select_layer = getattr(model, "visual_select_layer", None)
    found = _encoder_layers(tower) if tower is not None and select_layer is not None else None
    if found is None:
        return None
    prefix, num_layers = found
    result = Unreachable(select_layer, num_layers, layers_above(num_layers, select_layer))
    starts = {f"{prefix}.{layer}.": layer for layer in result.layers}
    for name, param in tower.named_parameters():
        if not param.requires_grad:
            continue
        for start, layer in starts.items():
            if name.startswith(start):
                result.tensors.append((layer, name.removeprefix(start), full_numel(param)))
    return result


def _span(layers: list[int]) -> str:
    """'layer 23', 'layers 22-23', 'layers 0-21'."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def _module_and_kind(name: str) -> tuple[str, str]:
    """'self_attn.q_proj.lora_A.default.weight' -> ('self_attn.q_proj', 'lora_A')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            return ".".join(parts[:i]), part
    return ".".join(parts[:-1]) or parts[-1], parts[-1]


def unreachable_line(found: Unreachable) -> str:
    """One line: the tensors that cannot receive a gradient and why, or that there are none."""
    index = selected_index(found.num_layers, found.select_layer)
    reads = f"visual_select_layer={found.select_layer} reads " + (
        f"the output of layer {index - 1}" if index else "the embeddings"
    )
    if not found.tensors:
        above = "; nothing above it is trained" if found.layers else ""
        return f"Parameters that cannot receive a gradient: none (ViT {reads}{above})"
    layers = sorted({layer for layer, _, _ in found.tensors})
    modules = dict.fromkeys(_module_and_kind(name)[0] for _, name, _ in found.tensors)
    kinds = dict.fromkeys(_module_and_kind(name)[1] for _, name, _ in found.tensors)
    numel = sum(n for _, _, n in found.tensors)
    return (
        f"ViT {_span(layers)}: {len(found.tensors)} trainable tensors ({numel:,} params: "
        f"{', '.join(kinds)} of {', '.join(modules)}) cannot receive a gradient: {reads}. "
        "They are counted above and carried in optimizer state (see docs/training.md)."
    )


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
    unreachable = unreachable_parameters(model)
    if unreachable is not None:
        lines.append(unreachable_line(unreachable))
    return lines


class AdapterSummaryHook(Hook):
    """Logs `summary_lines` once, before the first training step."""

    priority = "VERY_LOW"

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        for line in summary_lines(model):
            print_log(line, logger="current")
