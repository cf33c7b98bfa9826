"""The adapter kinds, one table: name -> `AdapterKind` (its label, how to build it, its variants).

    lora       LoRA       stock PEFT LoRA, no mixer
    dora       DoRA       PEFT's DoRA (magnitude and direction), a second strong baseline
    moslora    MoSLoRA    a learnable r x r mixer (any init of `inits.MIXER_INITS`)
    ts_mixing  TS-Mixing  the mixer fixed at the butterfly [[I, I], [I, I]] (paper Eq. 3)
    init_only  init-only  a random mixer folded into A at init, then a frozen identity (the PEFT
                          maintainers' control: is MoSLoRA's gain only its initialisation?)

The name is what an export's manifest records (`adapter_kind`) and what the ablation calls a
variant; the label is how every line a person reads spells it (the start-of-run summary, the
Table 5 report). `kind_of` says which kind a PEFT config builds; `args` are the adapter arguments
that turn any LoRA/MoSLoRA tower config into this kind (the ablation's `--cfg-options`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .layers import mixer_options_of

# dotted paths of the config factories, which XTuner's BUILDER imports from a config
MOSLORA_CONFIG = "llava_moslora.moslora.moslora_config"
LORA_CONFIG = "peft.LoraConfig"


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind.

    Attributes:
        name: the manifest's `adapter_kind` and the ablation variant's name.
        label: how people read it, everywhere.
        args: the adapter config arguments that make a tower this kind, `type` included.
        learned_mixer: whether its mixer is learned, so that its init is a free choice: the
            ablation then names one variant per init, `moslora_<init>`.
        about: one line for the docs.
    """

    name: str
    label: str
    args: Mapping[str, Any]
    learned_mixer: bool
    about: str
    mixer: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))
        object.__setattr__(self, "mixer", self.args["type"] == MOSLORA_CONFIG)


ADAPTER_KINDS: dict[str, AdapterKind] = {
    kind.name: kind
    for kind in (
        AdapterKind("lora", "LoRA", {"type": LORA_CONFIG}, False, "stock PEFT LoRA, no mixer"),
        AdapterKind(
            "ts_mixing",
            "TS-Mixing",
            {"type": MOSLORA_CONFIG, "mixer_init": "butterfly", "mixer_trainable": False},
            False,
            "the mixer fixed at the butterfly [[I, I], [I, I]] (paper Eq. 3)",
        ),
        AdapterKind(
            "moslora",
            "MoSLoRA",
            {"type": MOSLORA_CONFIG, "mixer_init": "kaiming"},
            True,
            "a learnable r x r mixer (the paper's method)",
        ),
        AdapterKind(
            "init_only",
            "init-only",
            {"type": MOSLORA_CONFIG, "mixer_init": "kaiming", "init_only": True},
            False,
            "a random mixer folded into A at init, then a frozen identity (PEFT maintainers' "
            "control)",
        ),
        AdapterKind(
            "dora",
            "DoRA",
            {"type": LORA_CONFIG, "use_dora": True},
            False,
            "PEFT's DoRA, a second strong baseline",
        ),
    )
}


def kind_of(config: Any) -> AdapterKind:
    """The kind a PEFT `LoraConfig` (plain or from `moslora_config`) builds.

    A frozen fixed mixer other than TS-Mixing's butterfly (a frozen identity, say) counts as
    MoSLoRA: the manifest's `mixer` field says which.
    """
    options = mixer_options_of(config)
    if options is None:
        return ADAPTER_KINDS["dora" if getattr(config, "use_dora", False) else "lora"]
    if options.init_only:
        return ADAPTER_KINDS["init_only"]
    if not options.learnable and options.init == "butterfly":
        return ADAPTER_KINDS["ts_mixing"]
    return ADAPTER_KINDS["moslora"]


def label_of(name: str | None) -> str | None:
    """The label of the kind `name` (a manifest's `adapter_kind`); an unknown name as it is."""
    return ADAPTER_KINDS[name].label if name in ADAPTER_KINDS else name
