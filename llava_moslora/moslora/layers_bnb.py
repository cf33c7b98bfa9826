"""QMoSLoRA: MoSLoRA on a bitsandbytes 4-bit (NF4) base layer.

Imported only when bitsandbytes is usable. PEFT's `Linear4bit` already dequantizes, adds the
variant's delta and requantizes on merge (with its rounding warning); this class adds the mixer and
restores the exact quantized weight on unmerge.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.bnb import Linear4bit

from .layers import _MoSLoRALayer


class MoSLoRALinear4bit(_MoSLoRALayer, Linear4bit):
    """MoSLoRA for `bnb.nn.Linear4bit` (NF4 / FP4, with or without double quantization)."""

    def _weight_snapshot(self) -> Any:
        # The Params4bit object itself: PEFT's merge replaces it with a requantized one.
        return self.get_base_layer().weight

    def _restore_weight(self, snapshot: Any) -> None:
        self.get_base_layer().weight = snapshot

    def _bias_delta(self, adapter: str) -> torch.Tensor:
        # PEFT's 4-bit merge adds lora_B.bias unscaled; undo exactly what it did.
        return self.lora_B[adapter].bias
