"""The r x r mixer of MoSLoRA and its initialisations (paper Sec. 3.2, Table 3).

Every init is written with tensor methods (`uniform_`, `normal_`, `torch.linalg.qr`) rather than
`torch.nn.init.*`: XTuner builds models inside `LoadWoInit`, which replaces the `torch.nn.init`
functions with no-ops, and a mixer created there would silently stay uninitialised memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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
    weight = torch.empty(r, r, device=device, dtype=dtype)
    if options.init == "kaiming":
        # kaiming_uniform_(a=sqrt(5)) with fan_in = r: gain sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / r)
        bound = 1.0 / math.sqrt(r)
        weight.uniform_(-bound, bound)
    elif options.init == "orthogonal":
        # Saxe et al. 2014: Q of a Gaussian matrix, signs fixed so the draw is uniform (Haar).
        q, upper = torch.linalg.qr(weight.normal_())
        weight = q * torch.sign(torch.diagonal(upper)).unsqueeze(0)
    elif options.init == "normal":
        weight.normal_(0.0, 1.0 / r)
    elif options.init == "identity":
        weight = torch.eye(r, device=device, dtype=dtype)
    elif options.init == "butterfly":
        weight = butterfly(r, device=device).to(dtype)
    return weight


def butterfly(r: int, *, device: torch.device | None = None) -> torch.Tensor:
    """TS-Mixing's fixed mixer [[I, I], [I, I]] (paper Eq. 3): x (A1 + A2)(B1 + B2)."""
    half = torch.eye(r // 2, device=device)
    return torch.cat([torch.cat([half, half], 1), torch.cat([half, half], 1)], 0)


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
