"""The MoSLoRA mixer options: one small dataclass of our own, validated once.

They ride along on a `peft.LoraConfig` (see `config.py`) instead of being new fields bolted onto
PEFT's config class, and are written next to the adapter as `moslora_config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..jsonfile import read_json_object
from .inits import MIXER_INITS, random_inits

OPTIONS_FILE = "moslora_config.json"


@dataclass(frozen=True)
class MixerOptions:
    """How the r x r mixer of one MoSLoRA adapter is initialised and trained.

    Args:
        init: a name in `inits.MIXER_INITS`: `kaiming` (paper default: uniform with a=sqrt(5),
            like LoRA's A), `orthogonal`, `identity`, `normal` (std 1/r), or `butterfly`
            (TS-Mixing's fixed [[I, I], [I, I]], needs an even r).
        trainable: whether the mixer is learned. `None` means "learned", except with `init_only`,
            where there is no mixer left to learn. A frozen mixer is stored as a buffer, so no
            optimizer, PEFT `set_adapter` or XTuner freeze logic can make it trainable by accident.
        init_only: the PEFT maintainers' control: draw the random mixer, fold it into A
            (A <- M A), and keep the mixer at a frozen identity. At step 0 the model is identical to
            MoSLoRA; afterwards it trains exactly like LoRA started from that A.
    """

    init: str = "kaiming"
    trainable: bool | None = None
    init_only: bool = False

    def __post_init__(self) -> None:
        if self.init == "zero":
            raise ValueError(
                "`mixer_init` should not be 'zero': with B initialised to zero (as LoRA does), a zero "
                "mixer gives A, B and the mixer all zero gradients, so training never starts "
                "(MoSLoRA paper, App. C). Use 'kaiming' (the paper's default) or 'orthogonal'."
            )
        if not isinstance(self.init, str) or self.init not in MIXER_INITS:
            raise ValueError(
                f"`mixer_init` should be one of {', '.join(MIXER_INITS)} but the value passed is "
                f"{self.init!r}."
            )
        if self.trainable not in (None, True, False):
            raise ValueError(
                f"`mixer_trainable` should be True, False or None but the value passed is "
                f"{self.trainable!r}."
            )
        if self.init_only not in (True, False):
            raise ValueError(
                f"`init_only` should be True or False but the value passed is {self.init_only!r}."
            )
        if self.init_only and not MIXER_INITS[self.init].random:
            raise ValueError(
                f"`init_only=True` folds a random mixer into A, but `mixer_init` is {self.init!r}, "
                f"which is not random. Use one of {', '.join(random_inits())}."
            )
        if self.init_only and self.trainable:
            raise ValueError(
                "`mixer_trainable=True` contradicts `init_only=True`: the init-only control folds the "
                "mixer into A and keeps it a frozen identity. Leave `mixer_trainable` unset."
            )

    @property
    def learnable(self) -> bool:
        """Whether the mixer is a trainable parameter (else a frozen buffer)."""
        return not self.init_only if self.trainable is None else self.trainable

    @property
    def fixed_matrix(self) -> bool:
        """Whether the mixer is frozen at a known, non-random matrix (vanilla LoRA's identity,
        TS-Mixing's butterfly, init-only's identity): a checkpoint must hold exactly that matrix."""
        return not self.learnable and (self.init_only or not MIXER_INITS[self.init].random)

    def check_rank(self, r: int) -> None:
        """Raise if this init cannot build an r x r mixer."""
        if MIXER_INITS[self.init].even_rank and r % 2:
            raise ValueError(
                f"`mixer_init={self.init!r}` splits the rank into two halves, so `r` should be even "
                f"but the value passed is {r}. Use an even `r`."
            )

    def to_dict(self) -> dict:
        return asdict(self)


def write_options(out_dir: str | Path, options: MixerOptions) -> None:
    """Write `moslora_config.json` (the mixer options) next to one adapter's adapter_config.json."""
    text = json.dumps(options.to_dict(), indent=2, sort_keys=True) + "\n"
    Path(out_dir, OPTIONS_FILE).write_text(text)


def read_options(adapter_dir: str | Path) -> MixerOptions | None:
    """The mixer options saved with an adapter by `save_adapter`, or None if it has none."""
    path = Path(adapter_dir, OPTIONS_FILE)
    if not path.is_file():
        return None
    fix = "copy it again from the run that saved the adapter, or save the adapter again."
    data = read_json_object(path, fix=fix)
    unknown = sorted(set(data) - {f.name for f in fields(MixerOptions)})
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {', '.join(map(repr, unknown))}: {fix}")
    try:
        return MixerOptions(**data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
