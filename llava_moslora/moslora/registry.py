"""Registration: which PEFT target layers become which MoSLoRA class.

PEFT's plugin hook is `LoraConfig._register_custom_module({BaseLayer: OurLayer})`, matched with
isinstance, first match wins; the mapping is not saved with an adapter, so every loading path
calls `register` again. It lives apart from the layer classes so that `layers.py` (nn.Linear) and
`layers_bnb.py` (bitsandbytes 4-bit, imported only when bitsandbytes is usable) both sit below it
and neither imports the other's module back.
"""

from __future__ import annotations

from peft.tuners.lora import LoraConfig
from torch import nn

from .layers import MoSLoRALinear


def refuse_unsupported_target(target: nn.Module, adapter_name: str, **kwargs) -> nn.Module:
    """Stands in PEFT's custom-module mapping for every layer type MoSLoRA has no class for.

    Without it PEFT would dispatch such a target (an `nn.Embedding`, a `Conv2d`, HF's `Conv1D`)
    to its own plain LoRA layer: the model would train LoRA there with no mixer and no warning.
    """
    name = kwargs.get("target_name") or "a target module"
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    raise ValueError(
        f"`target_modules` matched `{name}` ({type(base).__name__}), but MoSLoRA wraps only "
        f"nn.Linear layers (adapter {adapter_name!r}): it would silently get plain LoRA. Leave "
        "it out of `target_modules` (e.g. list the linear projections by name)."
    )


def register(config: LoraConfig) -> LoraConfig:
    """Map PEFT's target layers to the MoSLoRA classes on `config` (the 4-bit class first)."""
    mapping: dict[type[nn.Module], type[nn.Module]] = {}
    from peft.import_utils import is_bnb_4bit_available

    if is_bnb_4bit_available():
        import bitsandbytes as bnb

        from .layers_bnb import MoSLoRALinear4bit

        # bnb.nn.Linear4bit subclasses nn.Linear and PEFT matches with isinstance, first hit wins.
        mapping[bnb.nn.Linear4bit] = MoSLoRALinear4bit
    mapping[nn.Linear] = MoSLoRALinear
    mapping[nn.Module] = refuse_unsupported_target  # last: anything not matched above
    config._register_custom_module(mapping)
    return config
