"""Merge / unmerge / safe_merge / merge_and_unload with ΔW = s · B · M · A."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from llava_moslora.moslora import moslora_config
from tests.factories import LLAMA_TARGETS, make_mlp, make_tiny_llama, moslora_layers

TARGETS = ["lin0", "lin1"]


def moslora_mlp(dtype=torch.float32, **kwargs):
    base = make_mlp().to(dtype)
    config = moslora_config(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kwargs
    )
    return base, get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)


def base_weights(model) -> list[torch.Tensor]:
    return [layer.get_base_layer().weight.detach().clone() for layer in moslora_layers(model)]


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]
)
@pytest.mark.parametrize("safe", [False, True])
def test_merged_equals_unmerged_and_unmerge_is_bit_exact(dtype, tol, safe):
    base, mos = moslora_mlp(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    with torch.no_grad():
        unmerged = mos(x)
        assert (unmerged - base(x)).abs().max() > 5 * tol  # the adapter changes the output
        before = base_weights(mos)
        mos.merge_adapter(safe_merge=safe) if safe else mos.merge_adapter()
        assert all(layer.merged for layer in moslora_layers(mos))
        # bf16/fp16 keep the merged weight in 8/11 mantissa bits: the tolerance is that rounding.
        torch.testing.assert_close(mos(x), unmerged, atol=tol, rtol=tol)
        assert any(not torch.equal(w, b) for w, b in zip(base_weights(mos), before, strict=True))
        mos.unmerge_adapter()
        for w, b in zip(base_weights(mos), before, strict=True):
            assert torch.equal(w, b)  # bit for bit, in every dtype
        torch.testing.assert_close(mos(x), unmerged, atol=0, rtol=0)


def test_merge_twice_changes_nothing():
    _, mos = moslora_mlp()
    mos.merge_adapter()
    once = base_weights(mos)
    with pytest.warns(UserWarning, match="already merged"):
        mos.merge_adapter()
    assert all(torch.equal(a, b) for a, b in zip(base_weights(mos), once, strict=True))


def test_safe_merge_of_inf_mixer_raises_and_leaves_base_untouched():
    _, mos = moslora_mlp()
    before = base_weights(mos)
    layer = moslora_layers(mos)[0]
    with torch.no_grad():
        layer.lora_mixer["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.get_base_layer().weight, before[0])


def test_delta_weight_is_s_b_m_a():
    _, mos = moslora_mlp()
    layer = moslora_layers(mos)[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_mixer["default"].weight
    torch.testing.assert_close(layer.get_delta_weight("default"), 2.0 * b @ m @ a)


def test_merge_and_unload_llama_gives_plain_model_with_same_logits():
    base = make_tiny_llama()
    config = moslora_config(
        r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False
    )
    mos = get_peft_model(copy.deepcopy(base), config)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = mos(input_ids=ids).logits
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-2
        merged = mos.merge_and_unload()
        assert type(merged) is type(base)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_mixed_adapter_merge_order_unmerges_exactly():
    """A plain LoRA adapter and a MoSLoRA adapter on the same layers, merged and unmerged together."""
    from peft import LoraConfig

    base = make_mlp()
    mos = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    )
    mos.add_adapter(
        "mix", moslora_config(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    before = [m.get_base_layer().weight.detach().clone() for m in moslora_layers(mos, "mix")]
    x = torch.randn(4, 16)
    mos.base_model.set_adapter(["default", "mix"])
    with torch.no_grad():
        both = mos(x)
        mos.merge_adapter(["default", "mix"])
        torch.testing.assert_close(mos(x), both, atol=1e-5, rtol=1e-5)
        mos.unmerge_adapter()
        after = [m.get_base_layer().weight for m in moslora_layers(mos, "mix")]
        for w, b in zip(after, before, strict=True):
            torch.testing.assert_close(
                w, b, atol=1e-6, rtol=0
            )  # plain LoRA part: PEFT's subtraction


def test_dequantized_merge_of_dora_equals_peft_merge():
    """DoRA is not W + ΔW: each row is rescaled to its magnitude. The dense-base path must give
    what PEFT's own merge gives (and the unmerged model's outputs)."""
    from peft import LoraConfig

    from llava_moslora.moslora.merge import merge_and_unload_dequantized

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    dora = get_peft_model(make_mlp(), config)
    with torch.no_grad():  # trained-looking adapters: B != 0, magnitudes moved
        for name, param in dora.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(5, dora.base_model.model.lin0.in_features)
    with torch.no_grad():
        expected = dora(x)
        peft_merged = copy.deepcopy(dora).merge_and_unload()(x)
        ours = merge_and_unload_dequantized(dora, torch.float32)(x)
    torch.testing.assert_close(peft_merged, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
