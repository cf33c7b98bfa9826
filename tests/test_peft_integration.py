"""MoSLoRA behaves like a PEFT-native LoRA layer: adapters, dropout, rsLoRA, dtypes, real HF models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from llava_moslora.moslora import moslora_config
from tests.factories import (
    LLAMA_TARGETS,
    make_mlp,
    make_tiny_clip_vision,
    make_tiny_llama,
    moslora_layers,
)

TARGETS = ["lin0", "lin1"]


def test_options_errors_name_field_value_and_fix():
    with pytest.raises(ValueError, match=r"`mixer_init` should not be 'zero'.*App\. C.*'kaiming'"):
        moslora_config(r=4, mixer_init="zero")
    with pytest.raises(ValueError, match=r"`mixer_init` should be one of kaiming, .* 'xavier'"):
        moslora_config(r=4, mixer_init="xavier")
    with pytest.raises(ValueError, match=r"`r` should be even but the value passed is 5"):
        moslora_config(r=5, mixer_init="butterfly")
    with pytest.raises(ValueError, match=r"`init_only=True` .* 'identity', which is not random"):
        moslora_config(r=4, mixer_init="identity", init_only=True)
    with pytest.raises(ValueError, match=r"`mixer_trainable=True` contradicts `init_only=True`"):
        moslora_config(r=4, init_only=True, mixer_trainable=True)
    with pytest.raises(
        ValueError, match=r"`r` should be a positive integer value but the value passed is 0"
    ):
        get_peft_model(make_mlp(), moslora_config(r=0, target_modules=TARGETS))  # PEFT's own check


def test_dora_cannot_be_combined():
    with pytest.raises(
        ValueError, match=r"MoSLoRA cannot be combined with the LoRA variant DoraLinearVariant"
    ):
        get_peft_model(make_mlp(), moslora_config(r=4, target_modules=TARGETS, use_dora=True))


def test_trainable_parameters_are_exactly_a_b_and_mixer():
    mos = get_peft_model(make_mlp(), moslora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    trainable = {n for n, p in mos.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.{layer}.lora_{part}.default.weight"
        for layer in TARGETS
        for part in ("A", "B", "mixer")
    }
    n_trainable, _ = mos.get_nb_trainable_parameters()
    assert n_trainable == (16 * 4 + 4 * 32 + 4 * 4) + (32 * 4 + 4 * 8 + 4 * 4)


def test_several_adapters_set_disable_delete():
    base = make_mlp()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    )
    mos.add_adapter(
        "other",
        moslora_config(
            r=2,
            lora_alpha=2,
            target_modules=TARGETS,
            init_lora_weights=False,
            mixer_init="orthogonal",
        ),
    )
    x = torch.randn(4, 16)
    with torch.no_grad():
        out_default = mos(x)
        mos.set_adapter("other")
        out_other = mos(x)
        assert (out_default - out_other).abs().max() > 1e-3
        assert {n for n, p in mos.named_parameters() if p.requires_grad} >= {
            "base_model.model.lin0.lora_mixer.other.weight"
        }
        assert not any(p.requires_grad for n, p in mos.named_parameters() if ".default." in n)
        with mos.disable_adapter():
            torch.testing.assert_close(mos(x), base(x))
        mos.set_adapter("default")
        torch.testing.assert_close(mos(x), out_default)
        mos.delete_adapter("other")
        assert all("other" not in layer.lora_mixer for layer in moslora_layers(mos))
        assert not any(".other." in k for k in mos.state_dict())
        torch.testing.assert_close(mos(x), out_default)


def test_plain_lora_adapter_can_sit_beside_a_moslora_one():
    mos = get_peft_model(make_mlp(), moslora_config(r=4, target_modules=TARGETS))
    mos.add_adapter("plain", LoraConfig(r=4, target_modules=TARGETS))
    layer = moslora_layers(mos)[0]
    assert "plain" in layer.lora_A and "plain" not in layer.lora_mixer


def test_dropout_applies_to_the_adapter_branch_only_in_training():
    base = make_mlp()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.5, init_lora_weights=False
        ),
    )
    x = torch.randn(64, 16)
    mos.eval()
    with torch.no_grad():
        assert torch.equal(mos(x), mos(x))
        mos.train()
        torch.manual_seed(0)
        a = mos(x)
        torch.manual_seed(1)
        b = mos(x)
    assert (a - b).abs().max() > 1e-3


def test_rslora_scaling():
    mos = get_peft_model(
        make_mlp(),
        moslora_config(
            r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True, init_lora_weights=False
        ),
    )
    layer = moslora_layers(mos)[0]
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    a, b, m = (
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_mixer["default"].weight,
    )
    torch.testing.assert_close(layer.get_delta_weight("default"), 4.0 * b @ m @ a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_fp32_adapter(dtype):
    """PEFT's default autocast keeps adapters (mixer included) in fp32 on a half-precision base."""
    base = make_tiny_llama(dtype=dtype)
    mos = get_peft_model(
        base,
        moslora_config(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False),
    )
    layer = moslora_layers(mos)[0]
    assert layer.lora_mixer["default"].weight.dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == dtype
    ids = torch.randint(0, 128, (1, 6))
    logits = mos(input_ids=ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    assert layer.lora_mixer["default"].weight.grad.abs().sum() > 0


def test_model_dtype_move_carries_frozen_mixer_buffers():
    mos = get_peft_model(
        make_mlp(),
        moslora_config(r=4, target_modules=TARGETS, mixer_init="butterfly", mixer_trainable=False),
    )
    mos.to(torch.float64)
    layer = moslora_layers(mos)[0]
    assert layer.lora_mixer["default"].weight.dtype == torch.float64
    assert mos(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


def test_clip_vision_tower_with_moslora():
    base = make_tiny_clip_vision()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=4,
            lora_alpha=16,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        ),
    )
    assert len(moslora_layers(mos)) == 2 * 6
    pixels = torch.randn(2, 3, 28, 28)
    out = mos(pixel_values=pixels).last_hidden_state
    assert (out - base(pixel_values=pixels).last_hidden_state).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(layer.lora_mixer["default"].weight.grad is not None for layer in moslora_layers(mos))
