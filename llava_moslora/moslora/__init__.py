"""MoSLoRA / QMoSLoRA adapters as a plugin for stock PEFT (arXiv 2406.11909).

    from llava_moslora.moslora import moslora_config
    model = peft.get_peft_model(model, moslora_config(r=64, lora_alpha=128, target_modules=[...]))

Depends on torch and peft only (bitsandbytes lazily, for 4-bit bases).
"""

from .config import moslora_config
from .io import fold_mixer, load_adapter, save_adapter, save_folded
from .layers import MoSLoRALinear, MoSLoRAVariant, mixer_options_of, moslora_delta_weight
from .merge import merge_and_unload_dequantized
from .mixer import Mixer, initial_mixer
from .options import MIXER_INITS, MixerOptions
from .registry import register

__all__ = [
    "MIXER_INITS",
    "Mixer",
    "MixerOptions",
    "MoSLoRALinear",
    "MoSLoRAVariant",
    "fold_mixer",
    "initial_mixer",
    "load_adapter",
    "merge_and_unload_dequantized",
    "mixer_options_of",
    "moslora_config",
    "moslora_delta_weight",
    "register",
    "save_adapter",
    "save_folded",
]
