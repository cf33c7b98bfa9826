"""MoSLoRA inside XTuner's LLaVAModel: the mixer survives LoadWoInit and its state_dict filter."""

from __future__ import annotations

import math

import torch
from peft import get_peft_model

from llava_moslora.moslora import moslora_config
from tests.factories import build_llava, make_mlp, moslora_layers


def assert_kaiming(mixer: torch.Tensor) -> None:
    r = mixer.shape[0]
    assert torch.isfinite(mixer).all()
    assert mixer.abs().max() <= 1 / math.sqrt(r)  # kaiming_uniform(a=sqrt(5)) bound
    assert mixer.std() > 0.3 / math.sqrt(r)  # not zeros, not an uninitialised near-constant block


def test_mixer_initialised_inside_llava_and_kept_in_its_state_dict():
    model = build_llava()
    llm_layers, vit_layers = moslora_layers(model.llm), moslora_layers(model.visual_encoder)
    assert len(llm_layers) == 2 * 7 and len(vit_layers) == 2 * 6
    for layer in llm_layers + vit_layers:
        assert_kaiming(layer.lora_mixer["default"].weight)
    assert len({layer.lora_mixer["default"].weight.sum().item() for layer in llm_layers}) == len(
        llm_layers
    )

    state = model.state_dict()
    mixers = [k for k in state if "lora_mixer" in k]
    assert len([k for k in mixers if k.startswith("llm.")]) == len(llm_layers)
    assert len([k for k in mixers if k.startswith("visual_encoder.")]) == len(vit_layers)
    assert not any("base_layer" in k for k in state)  # XTuner's filter: adapters + projector only

    # A checkpoint written from that state dict restores the mixers into a freshly built model.
    other = build_llava(seed=1)
    missing, unexpected = other.load_state_dict(state, strict=False)
    assert not unexpected
    assert not [k for k in missing if "lora_" in k]
    for a, b in zip(
        llm_layers + vit_layers,
        moslora_layers(other.llm) + moslora_layers(other.visual_encoder),
        strict=True,
    ):
        assert torch.equal(a.lora_mixer["default"].weight, b.lora_mixer["default"].weight)


def test_mixer_init_does_not_depend_on_torch_nn_init():
    """Even under LoadWoInit (torch.nn.init.* are no-ops) the mixer gets its Kaiming draw."""
    from xtuner.model.utils import LoadWoInit

    base = make_mlp()
    with LoadWoInit():
        assert torch.nn.init.kaiming_uniform_(torch.zeros(3)) is None  # really patched
        mos = get_peft_model(base, moslora_config(r=8, target_modules=["lin0", "lin1"]))
    for layer in moslora_layers(mos):
        assert_kaiming(layer.lora_mixer["default"].weight)
