"""QMoSLoRA: MoSLoRA on a bitsandbytes 4-bit (NF4) base layer.

Imported only when bitsandbytes is usable. PEFT's `Linear4bit` already dequantizes, adds the
variant's delta and requantizes on merge (with its rounding warning); this class adds the mixer and
restores the exact quantized weight on unmerge.

Two bitsandbytes 0.50 CPU behaviours, seen on an AVX512 CPU, are handled when a layer is wrapped:

* `keep_standard_4bit_layout`: on a CPU with AVX512-BF16 it repacks a `Linear4bit` weight in place
  the first time it runs an eval forward without grad, into a layout its own `dequantize_4bit`
  (which PEFT's merge and ours call) does not read; the repacking itself fails for narrow layers.
* `check_cpu_dequantization`: its AVX512 CPU dequantize kernel gets rows wrong whose length is a
  multiple of 16 but not of the block size (e.g. 224 with blocks of 64), silently: the model
  would train and merge on garbage weights. Such a layer is refused with the fix. Every layer of
  the real towers (LLaMA-3, InternLM2, CLIP-L) is a multiple of 64 wide; GPUs are not affected.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from peft.tuners.lora.bnb import Linear4bit

from .layers import _MoSLoRALayer


def keep_standard_4bit_layout(layer: torch.nn.Module) -> None:
    """Switch off bitsandbytes' CPU repacking of `layer` (a `bnb.nn.Linear4bit`) and undo it if
    it already happened, as `Params4bit.cuda()` does, so the weight always dequantizes right.

    The cost: CPU inference of the 4-bit base no longer takes the AVX512-BF16 kernel. GPUs are
    not affected (the repacking is CPU-only).
    """
    if getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


@cache
def cpu_dequantizes_rows_of(width: int, blocksize: int, quant_type: str) -> bool:
    """Whether bitsandbytes' CPU kernels handle rows of `width`, on a random (8, width) probe:
    `dequantize_4bit` must return exactly the 4-bit codes times their block's absmax (its
    definition), and the round trip must stay within 4-bit rounding (under 1/4 of each block's
    absmax; the widest gap between NF4 or FP4 codes is 0.33)."""
    from bitsandbytes import functional as F

    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(8, width, generator=generator)
    n = probe.numel()
    packed, state = F.quantize_4bit(probe, blocksize=blocksize, quant_type=quant_type)
    flat = packed.view(torch.uint8).flatten()
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).flatten()[:n].long()
    scale = state.absmax.float().repeat_interleave(blocksize)[:n]
    expected = F.get_4bit_type(quant_type, device="cpu")[codes] * scale
    restored = F.dequantize_4bit(packed, state).flatten()
    blocks = torch.nn.functional.pad(probe.flatten(), (0, (-n) % blocksize)).view(-1, blocksize)
    block_max = blocks.abs().amax(dim=1).repeat_interleave(blocksize)[:n]
    close = ((restored - probe.flatten()).abs() <= block_max / 4).all()
    return torch.equal(restored, expected) and bool(close)


def check_cpu_dequantization(layer: torch.nn.Module) -> None:
    """Refuse a CPU `Linear4bit` whose rows bitsandbytes' CPU kernel dequantizes wrongly."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None or weight.device.type != "cpu":
        return
    width, blocksize = layer.in_features, state.blocksize
    if not cpu_dequantizes_rows_of(width, blocksize, state.quant_type):
        raise RuntimeError(
            f"bitsandbytes' CPU 4-bit kernel dequantizes this machine's rows of `in_features` "
            f"= {width} wrongly (seen on AVX512 CPUs for widths that are a multiple of 16 but "
            f"not of the block size {blocksize}), so this layer would train and merge "
            f"on wrong weights. Use layer widths that are multiples of {blocksize} (every real "
            "LLaMA / InternLM2 / CLIP layer is), keep this module out of the 4-bit "
            "quantization (`llm_int8_skip_modules`), or run the 4-bit model on a GPU."
        )


class MoSLoRALinear4bit(_MoSLoRALayer, Linear4bit):
    """MoSLoRA for `bnb.nn.Linear4bit` (NF4 / FP4, with or without double quantization)."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs):
        keep_standard_4bit_layout(self.get_base_layer())
        check_cpu_dequantization(self.get_base_layer())
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _weight_snapshot(self) -> Any:
        # The Params4bit object itself: PEFT's merge replaces it with a requantized one.
        return self.get_base_layer().weight

    def _restore_weight(self, snapshot: Any) -> None:
        self.get_base_layer().weight = snapshot

    def _bias_delta(self, adapter: str) -> torch.Tensor:
        # PEFT's 4-bit merge adds lora_B.bias unscaled; undo exactly what it did.
        return self.lora_B[adapter].bias
