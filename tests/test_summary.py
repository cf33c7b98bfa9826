"""The start-of-run summary: trainable parameters by group and the adapter kind per tower."""

from __future__ import annotations

import pytest
import torch

from llava_moslora.train.summary import (
    adapter_kind,
    base_weights,
    summary_lines,
    trainable_by_group,
)
from tests.conftest import HIDDEN_4BIT, make_tiny_llama
from tests.test_xtuner_llava import build_llava


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
    assert lines[-2].startswith("ViT adapter: MoSLoRA (mixer kaiming, learned), r=4")
    assert lines[-1] == "ViT base weights: float32"


@pytest.mark.parametrize("storage", [None, torch.float16])
def test_base_weights_reports_4bit_storage_as_built(tmp_path, storage):
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from llava_moslora.moslora import moslora_config

    make_tiny_llama(hidden_size=HIDDEN_4BIT).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        # None: bitsandbytes' default uint8 packing; float16: what XTuner's LLaVAModel asks for
        # under ZeRO-3, so that DeepSpeed can partition the packed weights.
        **({} if storage is None else {"bnb_4bit_quant_storage": storage}),
    )
    llm = LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, torch_dtype=torch.float32
    )
    llm = get_peft_model(llm, moslora_config(r=4, target_modules=["q_proj"]))
    expected = "uint8" if storage is None else "float16"
    layers = 2 * 7  # 2 decoder layers x q, k, v, o, gate, up, down
    assert base_weights(llm) == (
        f"4-bit NF4, double quant, storage {expected}, compute float32 ({layers} layers)"
    )
