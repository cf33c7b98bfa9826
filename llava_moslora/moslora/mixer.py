"""The r x r mixer of MoSLoRA and its initial value (paper Sec. 3.2, Table 3).

The inits themselves are the table in `inits.py`; `initial_mixer` draws the one the options name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .inits import MIXER_INITS
from .options import MixerOptions


def initial_mixer(
    options: MixerOptions,
    r: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw the initial (r, r) mixer, in float32 (float64 if asked): callers cast to the adapter dtype.

    float32 at least, so an orthogonal mixer is orthogonal to float32 precision even for a bf16
    adapter; float64 for float64 adapters, where tests check App. E.4 to float64 rounding.
    """
    options.check_rank(r)
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = MIXER_INITS[options.init].draw(torch.empty(r, r, device=device, dtype=dtype))
    if weight.shape != (r, r) or weight.dtype != dtype:
        raise ValueError(
            f"mixer init {options.init!r} returned a {tuple(weight.shape)} {weight.dtype} tensor; "
            f"its draw function should return the ({r}, {r}) {dtype} tensor it was given, filled."
        )
    return weight


class Mixer(nn.Module):
    """Holds one adapter's mixer `weight` (r, r), applied like `nn.Linear(r, r, bias=False)`.

    A learnable mixer is an `nn.Parameter`; a frozen one (vanilla LoRA, TS-Mixing, init-only, a fixed
    orthogonal mixer) is a persistent buffer: it is saved with the adapter but can never be turned
    trainable by PEFT's `set_adapter` or an optimizer built from `requires_grad`.
    """

    def __init__(self, weight: torch.Tensor, learnable: bool) -> None:
        super().__init__()
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    @property
    def learnable(self) -> bool:
        return isinstance(self.weight, nn.Parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called as a module (not by reading `.weight`) so DeepSpeed ZeRO-3 gathers the weight.
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        r = self.weight.shape[0]
        return f"r={r}, learnable={self.learnable}"
