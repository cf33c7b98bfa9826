r"""MoSLoRA layers for stock PEFT: LoRA with a learnable r x r mixer between A and B.

Paper (arXiv 2406.11909, Eq. 8) in post-multiplication: y = x W0 + x A W B. PEFT stores
`lora_A.weight` (r, in) and `lora_B.weight` (out, r), so here, with M = `lora_mixer[name].weight`:

        x ──────────────── base_layer (W0, frozen) ─────────────────┐
        │                                                           + ── y
        └─ dropout ─ lora_A (r, in) ─ mixer M (r, r) ─ lora_B (out, r) ─ × s ─┘

    ΔW = s · B · M · A        (s = alpha / r, or alpha / sqrt(r) with rsLoRA)

Vanilla LoRA is M = I frozen; TS-Mixing (paper Eq. 3) is M = [[I, I], [I, I]] frozen.

The maths lives in one `LoraVariant` (like PEFT's DoRA), so PEFT's own `forward`, `merge`,
`safe_merge`, `merge_and_unload`, mixed-batch inference and the 4-bit dequantize/requantize merge
all run it. The mixer is the per-adapter `lora_mixer` ModuleDict listed in `adapter_layer_names`,
so set_adapter, disable/delete_adapter, device moves and every "lora_" state-dict filter (PEFT's,
XTuner's LLaVAModel.state_dict) keep it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import nn
from torch.nn import functional as F

from ..probes import zero3_partitioned
from .mixer import Mixer, initial_mixer
from .options import MixerOptions

# The attribute on a LoraConfig that carries the MixerOptions of a MoSLoRA adapter (see config.py).
OPTIONS_ATTR = "_moslora_mixer"


def mixer_options_of(config: LoraConfig) -> MixerOptions | None:
    """The MoSLoRA options riding on `config`, or None for a plain LoRA config."""
    return getattr(config, OPTIONS_ATTR, None)


def moslora_delta_weight(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """ΔW = s · B · M · A, shaped like the base weight (fan_in_fan_out respected)."""
    weight_a = layer.lora_A[adapter].weight  # (r, in)
    weight_b = layer.lora_B[adapter].weight  # (out, r)
    mixer = layer.lora_mixer[adapter].weight  # (r, r)
    dtype = weight_b.dtype
    # As PEFT does: CPU matmuls in fp16/bf16 are slow and lossy, so build the delta in fp32.
    compute_dtype = torch.float32 if weight_b.device.type == "cpu" else dtype
    if dtype not in (torch.float16, torch.bfloat16):
        compute_dtype = dtype
    weight_a, weight_b = weight_a.to(compute_dtype), weight_b.to(compute_dtype)
    mixer = mixer.to(device=weight_b.device, dtype=compute_dtype)
    delta = weight_b @ (mixer @ weight_a)  # (out, r) @ (r, in): r^2·in + out·r·in flops
    delta = transpose(delta, getattr(layer, "fan_in_fan_out", False)) * layer.scaling[adapter]
    return delta.to(dtype)


def _mixed_b(lora_b: nn.Linear, mixer: Mixer) -> torch.Tensor:
    """B · M, shape (out, r), as one small matmul: a single extra kernel forward, two backward.

    Under ZeRO-3 the weights are only gathered inside their own module's forward, so there it is
    built by calling the modules on an identity instead: lora_b(mixer(I)) = M^T B^T = (B M)^T.
    """
    weight_b = lora_b.weight
    if zero3_partitioned(weight_b) or zero3_partitioned(mixer.weight):
        # in_features, not weight_b.shape: a partitioned ZeRO-3 weight is an empty placeholder here.
        eye = torch.eye(lora_b.in_features, device=weight_b.device, dtype=weight_b.dtype)
        return lora_b(mixer(eye)).T
    return weight_b @ mixer.weight.to(weight_b.dtype)  # (out, r) @ (r, r)


class MoSLoRAVariant(LoraVariant):
    """The MoSLoRA maths, called by PEFT's Linear / Linear4bit forward and merge code."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        options = mixer_options_of(config)
        lora_a = module.lora_A[adapter_name].weight
        mixer = initial_mixer(
            options, module.r[adapter_name], device=lora_a.device, dtype=lora_a.dtype
        )
        if options.init_only:
            # PEFT maintainers' control: A <- M A (ΔW unchanged at step 0), then a frozen identity.
            with torch.no_grad():
                lora_a.copy_((mixer @ lora_a.to(mixer.dtype)).to(lora_a.dtype))
            mixer = torch.eye(mixer.shape[0], device=lora_a.device, dtype=mixer.dtype)
        module.lora_mixer[adapter_name] = Mixer(mixer.to(lora_a.dtype), options.learnable)
        module.mixer_options[adapter_name] = options

    @staticmethod
    def forward(
        module: LoraLayer,
        active_adapter: str,
        x: torch.Tensor,
        result: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        lora_a = module.lora_A[active_adapter]
        lora_b = module.lora_B[active_adapter]
        mixer = module.lora_mixer[active_adapter]
        hidden = lora_a(module.lora_dropout[active_adapter](x))  # (..., r)
        tokens = hidden.numel() // hidden.shape[-1]
        # Two equal ways to apply M; pick the cheaper (extra flops and saved activations):
        #   chain  B(M(h)):    tokens · r^2 flops, one more (tokens, r) activation kept for backward
        #   fold   h (B M)^T:  out · r^2 flops, one (out, r) matrix kept for backward
        # A lora_B bias would be added r times by the fold's module-call form: chain then.
        if lora_b.bias is None and module.out_features < tokens:
            delta = F.linear(hidden, _mixed_b(lora_b, mixer))
        else:
            delta = lora_b(mixer(hidden))
        return result + delta * module.scaling[active_adapter]

    @staticmethod
    def merge_safe(
        module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor
    ) -> torch.Tensor:
        merged = orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)
        if torch.isfinite(merged).all():  # else PEFT raises and nothing is merged: keep no snapshot
            module._snapshot_before_merge(active_adapter)
        return merged

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        module._snapshot_before_merge(active_adapter)
        # A new tensor, not `+=`: the snapshot keeps the old storage for a bit-exact unmerge.
        orig_weight.data = orig_weight.data + module.get_delta_weight(active_adapter).to(
            orig_weight.dtype
        )

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # Only reached when no snapshot exists (see _MoSLoRALayer.unmerge).
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


class _MoSLoRALayer:
    """What MoSLoRA adds to a PEFT LoRA layer class; mixed in before the PEFT class."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_mixer",)
    other_param_names = LoraLayer.other_param_names + ("mixer_options",)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs
    ):
        if "lora_mixer" not in self._modules:  # first adapter: PEFT's __init__ knows no mixer
            self.lora_mixer = nn.ModuleDict()
            self.mixer_options: dict[str, MixerOptions] = {}
            # Weight before each MoSLoRA merge, so unmerge restores it bit for bit (the subtraction
            # W + ΔW - ΔW is not exact in floating point, and loses bits fast in bf16).
            self._premerge_weights: dict[str, Any] = {}
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> LoraVariant | None:
        other = super().resolve_lora_variant(config=config, **kwargs)
        if mixer_options_of(config) is None:  # a plain LoRA adapter on a MoSLoRA layer is fine
            return other
        if other is not None:
            raise ValueError(
                f"MoSLoRA cannot be combined with the LoRA variant {type(other).__name__} "
                "(`use_dora`, `alora_invocation_tokens`, `arrow_config`, ...). Build a plain "
                "`LoraConfig` for that variant instead of `moslora_config`."
            )
        return MoSLoRAVariant()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter in self.lora_mixer:
            return moslora_delta_weight(self, adapter)
        return super().get_delta_weight(adapter)

    # -- bit-exact unmerge -------------------------------------------------------------------------
    def _weight_snapshot(self) -> Any:
        return self.get_base_layer().weight.data

    def _restore_weight(self, snapshot: Any) -> None:
        self.get_base_layer().weight.data = snapshot

    def _snapshot_before_merge(self, adapter: str) -> None:
        self._premerge_weights[adapter] = self._weight_snapshot()

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters and self.merged_adapters[-1] in self._premerge_weights:
            adapter = self.merged_adapters.pop()
            self._restore_weight(self._premerge_weights.pop(adapter))
            if self.lora_bias.get(adapter):
                self.get_base_layer().bias.data -= self._bias_delta(adapter)
        if self.merged_adapters:
            super().unmerge()

    def _bias_delta(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].bias * self.scaling[adapter]


class MoSLoRALinear(_MoSLoRALayer, lora_layer.Linear):
    """MoSLoRA for `nn.Linear`."""
