"""The mixer inits, one table: name -> `MixerInit` (its draw function and properties).

Everything that knows about inits reads this table: `MixerOptions` validation (name, `init_only`
needs a random one, even rank), `initial_mixer`, the checkpoint check of frozen fixed mixers
(runs.py), the ablation's `moslora_<init>` variants, the docs and the tests. An entry is made
only by decorating its draw function, so a name without a function cannot exist:

    @mixer_init("kaiming", random=True, about="uniform with a=sqrt(5), like LoRA's A")
    def _kaiming(weight: torch.Tensor) -> torch.Tensor: ...

A draw function gets an uninitialised (r, r) float32/float64 tensor and returns the mixer (filled
in place or new). It uses tensor methods (`uniform_`, `normal_`, `torch.linalg.qr`), never
`torch.nn.init.*`: XTuner builds models inside `LoadWoInit`, which turns the `torch.nn.init`
functions into no-ops, and a mixer drawn there would silently stay uninitialised memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Draw = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MixerInit:
    """One mixer init.

    Attributes:
        name: the `mixer_init` value that selects it.
        draw: fills an uninitialised (r, r) tensor with the initial mixer (see the module docstring).
        random: whether it draws at random. Only a random mixer can be folded into A (`init_only`);
            a fixed one (identity, butterfly) is a known matrix, so a frozen one must reload as
            exactly that matrix (`runs.check_frozen_mixers`).
        even_rank: whether it needs an even `r` (butterfly splits the rank in halves).
        about: one line for the docs and error messages.
    """

    name: str
    draw: Draw
    random: bool
    even_rank: bool
    about: str

    def __post_init__(self) -> None:
        if not callable(self.draw):
            raise TypeError(
                f"mixer init {self.name!r}: `draw` should be a function, got {self.draw!r}"
            )


MIXER_INITS: dict[str, MixerInit] = {}


def mixer_init(
    name: str, *, random: bool, about: str, even_rank: bool = False
) -> Callable[[Draw], Draw]:
    """Register the decorated function as the mixer init `name` (the module docstring's recipe)."""

    def register(draw: Draw) -> Draw:
        if name in MIXER_INITS:
            raise ValueError(f"mixer init {name!r} is registered twice")
        MIXER_INITS[name] = MixerInit(name, draw, random=random, even_rank=even_rank, about=about)
        return draw

    return register


def random_inits() -> tuple[str, ...]:
    """The inits that draw at random: the only ones `init_only` accepts."""
    return tuple(name for name, entry in MIXER_INITS.items() if entry.random)


@mixer_init("kaiming", random=True, about="uniform with a=sqrt(5), like LoRA's A (paper default)")
def _kaiming(weight: torch.Tensor) -> torch.Tensor:
    # kaiming_uniform_(a=sqrt(5)) with fan_in = r: gain sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / r)
    bound = 1.0 / math.sqrt(weight.shape[0])
    return weight.uniform_(-bound, bound)


@mixer_init("orthogonal", random=True, about="a uniformly random orthogonal matrix")
def _orthogonal(weight: torch.Tensor) -> torch.Tensor:
    # Saxe et al. 2014: Q of a Gaussian matrix, signs fixed so the draw is uniform (Haar).
    q, upper = torch.linalg.qr(weight.normal_())
    return q * torch.sign(torch.diagonal(upper)).unsqueeze(0)


@mixer_init("identity", random=False, about="the identity: frozen, it is vanilla LoRA")
def _identity(weight: torch.Tensor) -> torch.Tensor:
    return torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype)


@mixer_init("normal", random=True, about="Gaussian with std 1/r")
def _normal(weight: torch.Tensor) -> torch.Tensor:
    return weight.normal_(0.0, 1.0 / weight.shape[0])


@mixer_init(
    "butterfly",
    random=False,
    even_rank=True,
    about="TS-Mixing's fixed [[I, I], [I, I]] (paper Eq. 3); needs an even r",
)
def _butterfly(weight: torch.Tensor) -> torch.Tensor:
    return butterfly(weight.shape[0], device=weight.device).to(weight.dtype)


def butterfly(r: int, *, device: torch.device | None = None) -> torch.Tensor:
    """TS-Mixing's fixed mixer [[I, I], [I, I]] (paper Eq. 3): x (A1 + A2)(B1 + B2)."""
    half = torch.eye(r // 2, device=device)
    return torch.cat([torch.cat([half, half], 1), torch.cat([half, half], 1)], 0)
