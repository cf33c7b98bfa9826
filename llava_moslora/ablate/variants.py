"""The adapter variants an ablation compares, as `--cfg-options` on one base config.

Every variant sets the adapter `type` of both towers explicitly, so the base config may be any
MoSLoRA or LoRA config (`configs/tiny_compositional_moslora.py`, `configs/llama3_moslora.py`, ...):
all variants then share its data, schedule, rank and targets, and differ only in the adapter.

The variants are the adapter kinds of `llava_moslora.moslora.kinds.ADAPTER_KINDS` (lora, ts_mixing,
init_only, dora), with MoSLoRA, whose mixer init is a free choice, named per init:
`moslora_kaiming` and `moslora_orthogonal` (the paper's two) are listed, and `moslora_<init>`
works for every init of `llava_moslora.moslora.inits.MIXER_INITS`, one registered later included.
"""

from __future__ import annotations

from llava_moslora.moslora.inits import MIXER_INITS
from llava_moslora.moslora.kinds import ADAPTER_KINDS

# cfg.model.<key> of each tower's adapter config, which a variant overrides
ADAPTER_CONFIG_KEYS = ("llm_lora", "visual_encoder_lora")
# The learned-mixer inits listed as variants (the paper's Table 3 pair); others by name.
LISTED_INITS = ("kaiming", "orthogonal")


def _variants() -> dict[str, dict[str, object]]:
    variants: dict[str, dict[str, object]] = {}
    for kind in ADAPTER_KINDS.values():
        if kind.learned_mixer:
            for init in LISTED_INITS:
                variants[f"{kind.name}_{init}"] = {**kind.args, "mixer_init": init}
        else:
            variants[kind.name] = dict(kind.args)
    return variants


# variant -> the adapter arguments it sets on both towers
VARIANTS: dict[str, dict[str, object]] = _variants()
BASELINE = "lora"
# What `llava-moslora ablate` compares unless `--variants` says otherwise: all but DoRA.
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if name != "dora")


# Pairs compared directly, besides every variant against BASELINE: (variant, its control). The
# learned Kaiming mixer against the same init folded into A and frozen says whether *learning* the
# mixer matters, apart from its init.
DIRECT_PAIRS: tuple[tuple[str, str], ...] = (("moslora_kaiming", "init_only"),)


def variant_args(name: str) -> dict[str, object] | None:
    """The adapter arguments of the variant `name`, or None if there is no such variant."""
    if name in VARIANTS:
        return VARIANTS[name]
    for kind in ADAPTER_KINDS.values():
        init = name.removeprefix(f"{kind.name}_")
        if kind.learned_mixer and init != name and init in MIXER_INITS:
            return {**kind.args, "mixer_init": init}
    return None


def _known() -> str:
    learned = [kind.name for kind in ADAPTER_KINDS.values() if kind.learned_mixer]
    return ", ".join([*VARIANTS, *(f"{name}_<init>" for name in learned)])


def parse_variants(text: str) -> list[str]:
    """`lora,moslora_kaiming` -> ["lora", "moslora_kaiming"]; unknown names are refused."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if variant_args(name) is None]
    if not names or unknown:
        raise ValueError(
            f"`--variants` should be a comma-separated list of {_known()} (<init> one of "
            f"{', '.join(MIXER_INITS)}), got {text!r}"
            + (f" ({', '.join(unknown)} unknown)" if unknown else "")
        )
    return names


def cfg_options(variant: str) -> list[str]:
    """The `xtuner train --cfg-options` items that turn the base config into `variant`."""
    args = variant_args(variant)
    if args is None:
        raise ValueError(f"`variant` should be one of {_known()}, got {variant!r}")
    return [
        f"model.{key_of_tower}.{key}={value}"
        for key_of_tower in ADAPTER_CONFIG_KEYS
        for key, value in args.items()
    ]
