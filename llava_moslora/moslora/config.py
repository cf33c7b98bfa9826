"""`moslora_config`: a stock `peft.LoraConfig` that builds MoSLoRA layers."""

from __future__ import annotations

import math
from typing import Any

from peft import LoraConfig

from .layers import OPTIONS_ATTR
from .options import MixerOptions
from .registry import register


def check_rank_and_alpha(r: Any, lora_alpha: Any) -> None:
    """Refuse an `r` that is not a positive int and a `lora_alpha` that is not a positive number.

    Stock `LoraConfig` accepts both and fails later (r=0 when the layers are built) or never
    (lora_alpha=0 trains nothing: the scale alpha / r is zero; a negative one flips the update).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(
            f"`r` should be a positive integer value but the value passed is {r!r}. Use the "
            "adapter rank, e.g. r=16."
        )
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        raise ValueError(
            f"`lora_alpha` should be a positive number but the value passed is {lora_alpha!r}: "
            "the update is scaled by lora_alpha / r, so 0 trains nothing and a negative value "
            "flips it. Use e.g. lora_alpha=2 * r."
        )


def check_lora_options(config: LoraConfig) -> None:
    """Refuse what stock `LoraConfig` accepts and fails on later or never: `r` and `lora_alpha`
    (check_rank_and_alpha), and a `lora_dropout` outside [0, 1) (torch refuses it only when the
    layers are built; 1 would drop the whole adapter input). For plain LoRA configs too: `train`
    checks every adapter of a config with it before XTuner starts."""
    check_rank_and_alpha(config.r, config.lora_alpha)
    dropout = config.lora_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(
            f"`lora_dropout` should be a probability in [0, 1) but the value passed is "
            f"{dropout!r}. Use e.g. lora_dropout=0.05, or 0 for none."
        )


def moslora_config(
    *,
    mixer_init: str = "kaiming",
    mixer_trainable: bool | None = None,
    init_only: bool = False,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` whose adapters are MoSLoRA (ΔW = s · B · M · A, M an r x r mixer).

    Every LoRA argument (`r`, `lora_alpha`, `target_modules`, `lora_dropout`, `use_rslora`, ...)
    passes through to `LoraConfig`, so this works as `type=moslora_config` in an XTuner config.

    Args:
        mixer_init: a name of `inits.MIXER_INITS`: `kaiming` (default, the paper's),
            `orthogonal`, `identity`, `normal`, `butterfly` (TS-Mixing), or one registered with
            `inits.mixer_init`. `zero` is refused (paper App. C).
        mixer_trainable: learn the mixer (default) or freeze it; frozen `identity` is vanilla LoRA,
            frozen `butterfly` is TS-Mixing.
        init_only: fold the random mixer into A at init and keep a frozen identity (the control
            that asks whether MoSLoRA's gain is only its initialisation).

    The options are validated here, travel on the config object, and are saved as
    `moslora_config.json` by `save_adapter`; PEFT's own adapter_config.json stays stock.
    """
    options = MixerOptions(init=mixer_init, trainable=mixer_trainable, init_only=init_only)
    config = LoraConfig(**lora_kwargs)
    check_lora_options(config)
    options.check_rank(config.r)
    setattr(config, OPTIONS_ATTR, options)
    return register(config)
