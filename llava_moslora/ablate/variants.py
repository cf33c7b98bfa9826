"""The adapter variants an ablation compares, as `--cfg-options` on one base config.

Every variant sets the adapter `type` of both towers explicitly, so the base config may be any
MoSLoRA or LoRA config (`configs/tiny_compositional_moslora.py`, `configs/llama3_moslora.py`, ...):
all variants then share its data, schedule, rank and targets, and differ only in the adapter.

    lora                stock PEFT LoRA (no mixer)
    ts_mixing           fixed butterfly mixer [[I, I], [I, I]] (the paper's TS-Mixing, Eq. 3)
    moslora_kaiming     learnable mixer, Kaiming-uniform init (the paper's default)
    moslora_orthogonal  learnable mixer, orthogonal init
    init_only           the Kaiming mixer folded into A at init, then a frozen identity: asks
                        whether MoSLoRA's gain is its initialisation (PEFT maintainers' control)
    dora                PEFT's DoRA, as a second strong baseline
"""

from __future__ import annotations

MOSLORA = "llava_moslora.moslora.moslora_config"  # dotted paths: XTuner's BUILDER imports them
LORA = "peft.LoraConfig"
# cfg.model.<key> of each tower's adapter config, which a variant overrides
ADAPTER_CONFIG_KEYS = ("llm_lora", "visual_encoder_lora")

# variant -> the adapter arguments it sets on both towers
VARIANTS: dict[str, dict[str, object]] = {
    "lora": {"type": LORA},
    "ts_mixing": {"type": MOSLORA, "mixer_init": "butterfly", "mixer_trainable": False},
    "moslora_kaiming": {"type": MOSLORA, "mixer_init": "kaiming"},
    "moslora_orthogonal": {"type": MOSLORA, "mixer_init": "orthogonal"},
    "init_only": {"type": MOSLORA, "mixer_init": "kaiming", "init_only": True},
    "dora": {"type": LORA, "use_dora": True},
}
BASELINE = "lora"


# Pairs compared directly, besides every variant against BASELINE: (variant, its control). The
# learned Kaiming mixer against the same init folded into A and frozen says whether *learning* the
# mixer matters, apart from its init.
DIRECT_PAIRS: tuple[tuple[str, str], ...] = (("moslora_kaiming", "init_only"),)


def parse_variants(text: str) -> list[str]:
    """`lora,moslora_kaiming` -> ["lora", "moslora_kaiming"]; unknown names are refused."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in VARIANTS]
    if not names or unknown:
        raise ValueError(
            f"`--variants` should be a comma-separated list of {', '.join(VARIANTS)}, "
            f"got {text!r}" + (f" ({', '.join(unknown)} unknown)" if unknown else "")
        )
    return names


def cfg_options(variant: str) -> list[str]:
    """The `xtuner train --cfg-options` items that turn the base config into `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"`variant` should be one of {', '.join(VARIANTS)}, got {variant!r}")
    return [
        f"model.{key_of_tower}.{key}={value}"
        for key_of_tower in ADAPTER_CONFIG_KEYS
        for key, value in VARIANTS[variant].items()
    ]
