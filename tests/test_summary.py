"""The start-of-run summary: trainable parameters by group, the adapter kind per tower, and the
trainable tensors that cannot receive a gradient."""

from __future__ import annotations

import pytest
import torch

from llava_moslora.train.summary import (
    adapter_kind,
    base_weights,
    summary_lines,
    trainable_by_group,
    unreachable_line,
    unreachable_parameters,
)
from tests.factories import CLIP_LAYER_LINEARS, build_from_config, build_llava, load_4bit

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_mixer")
# The documented switch back to the paper's exact target list (every ViT layer adapted).
PAPER_TARGETS = {"model.visual_encoder_lora.layers_to_transform": None}


def test_trainable_parameters_by_group_match_the_adapter_shapes():
    model = build_llava()
    counts = trainable_by_group(model)
    # tiny LLaMA: hidden 32, intermediate 64, 4 heads / 2 KV heads of 8 -> k,v project to 16; r=8.
    r = 8
    llm_shapes = [
        (32, 32),
        (32, 16),
        (32, 16),
        (32, 32),
        (32, 64),
        (32, 64),
        (64, 32),
    ]  # q k v o gate up down
    per_layer = sum(i * r + r * o for i, o in llm_shapes)
    assert counts["llm adapter"] == 2 * per_layer
    assert counts["llm mixers"] == 2 * 7 * r * r
    # tiny CLIP: hidden 32, intermediate 64; q k v out fc1 fc2 with r=4.
    vit_shapes = [(32, 32)] * 4 + [(32, 64), (64, 32)]
    assert counts["vit adapter"] == 2 * sum(i * 4 + 4 * o for i, o in vit_shapes)
    assert counts["vit mixers"] == 2 * 6 * 4 * 4
    # The 2-layer projector: Linear(32, 32) + GELU + Linear(32, 32), with biases.
    assert counts["projector"] == 2 * (32 * 32 + 32)
    assert counts["other"] == 0


def test_adapter_kind_and_summary_lines():
    model = build_llava()
    assert adapter_kind(model.llm) == "MoSLoRA (mixer kaiming, learned), r=8, alpha=16"
    assert adapter_kind(model.projector) == "none"
    lines = summary_lines(model)
    assert lines[0] == "Trainable parameters by group:"
    assert any(line.split() == ["llm", "mixers", "896"] for line in lines)
    assert lines[-3].startswith("ViT adapter: MoSLoRA (mixer kaiming, learned), r=4")
    assert lines[-2] == "ViT base weights: float32"
    # build_llava adapts both layers of its 2-layer CLIP, and LLaVA reads layer 0's output. r=4 on
    # hidden 32 / MLP 64: per attention projection A 4x32 + B 32x4 + mixer 4x4 = 272, per MLP
    # linear 4x32 + 64x4 + 16 = 400 (fc1) and 4x64 + 32x4 + 16 = 400 (fc2): 4 x 272 + 800 = 1,888.
    assert lines[-1] == (
        "ViT layer 1: 18 trainable tensors (1,888 params: lora_A, lora_B, lora_mixer of "
        + ", ".join(CLIP_LAYER_LINEARS)
        + ") cannot receive a gradient: visual_select_layer=-2 reads the output of layer 0. "
        "They are counted above and carried in optimizer state (see docs/training.md)."
    )


@pytest.mark.parametrize("storage", [None, torch.float16])
def test_base_weights_reports_4bit_storage_as_built(llama_4bit_dir, storage):
    from peft import get_peft_model

    from llava_moslora.moslora import moslora_config

    # None: bitsandbytes' default uint8 packing; float16: what XTuner's LLaVAModel asks for
    # under ZeRO-3, so that DeepSpeed can partition the packed weights.
    extra = {} if storage is None else {"bnb_4bit_quant_storage": storage}
    llm = get_peft_model(
        load_4bit(llama_4bit_dir, **extra), moslora_config(r=4, target_modules=["q_proj"])
    )
    expected = "uint8" if storage is None else "float16"
    layers = 2 * 7  # 2 decoder layers x q, k, v, o, gate, up, down
    assert base_weights(llm) == (
        f"4-bit NF4, double quant, storage {expected}, compute float32 ({layers} layers)"
    )


def without_gradient(model, samples: list[dict]) -> set[str]:
    """Trainable tensors whose gradient is missing or all zero after one backward on `samples`.

    LoRA's B starts at zero, which by design gives A and the mixer a zero gradient at step 0; B
    gets random values first, so that a zero gradient can only mean a tensor out of reach.
    """
    from xtuner.dataset.collate_fns import default_collate_fn

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model(default_collate_fn(samples)["data"], mode="loss")["loss"].backward()
    return {
        name
        for name, param in model.named_parameters()
        if param.requires_grad and (param.grad is None or not param.grad.any())
    }


def test_summary_names_the_unread_vit_layer_with_the_papers_targets(tiny_env, tiny_samples):
    """On the make-tiny LLaVA (3-layer CLIP), built from the config as `xtuner train` builds it."""
    _, model = build_from_config("tiny_moslora", PAPER_TARGETS)
    found = unreachable_parameters(model)
    assert (found.select_layer, found.num_layers, found.layers) == (-2, 3, [2])
    names = {f"{m}.{t}.default.weight" for m in CLIP_LAYER_LINEARS for t in ADAPTER_TENSORS}
    assert {layer for layer, _, _ in found.tensors} == {2}
    assert {name for _, name, _ in found.tensors} == names
    # r=64 on hidden 64 / MLP 256: A, B and mixer are 64x64 on the 4 attention projections;
    # fc1 and fc2 each have one 64x256 factor instead of a 64x64 one.
    params = 4 * 3 * 64 * 64 + 2 * (2 * 64 * 64 + 64 * 256)
    line = (
        f"ViT layer 2: 18 trainable tensors ({params:,} params: lora_A, lora_B, lora_mixer of "
        + ", ".join(CLIP_LAYER_LINEARS)
        + ") cannot receive a gradient: visual_select_layer=-2 reads the output of layer 1. "
        "They are counted above and carried in optimizer state (see docs/training.md)."
    )
    assert params == 98_304 and unreachable_line(found) == line
    assert summary_lines(model)[-1] == line
    # What the line claims is what backward does: exactly those tensors get no gradient.
    layer_2 = "visual_encoder.base_model.model.vision_model.encoder.layers.2."
    assert without_gradient(model, tiny_samples) == {layer_2 + name for name in names}


@pytest.mark.parametrize("name", ["tiny_moslora", "tiny_lora"])
def test_with_the_default_configs_every_trainable_tensor_gets_a_gradient(
    name, tiny_env, tiny_samples
):
    _, model = build_from_config(name)
    counts = trainable_by_group(model)
    # The ViT is adapted in its layers 0 and 1 (r=64, hidden 64 / MLP 256), the mixers if MoSLoRA.
    assert counts["vit adapter"] == 2 * (4 * 2 * 64 * 64 + 2 * (64 * 64 + 64 * 256))
    assert counts["vit mixers"] == (2 * 6 * 64 * 64 if name == "tiny_moslora" else 0)
    found = unreachable_parameters(model)
    assert found.layers == [2] and found.tensors == []
    assert summary_lines(model)[-1] == (
        "Parameters that cannot receive a gradient: none "
        "(ViT visual_select_layer=-2 reads the output of layer 1; nothing above it is trained)"
    )
    assert without_gradient(model, tiny_samples) == set()
