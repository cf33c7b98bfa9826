"""Saving, loading and folding: the mixer is never dropped silently."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from llava_moslora.moslora import load_adapter, save_adapter, save_folded
from tests.factories import make_tiny_llama, trained_moslora

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 4]])


def test_save_then_load_adapter_round_trip(tmp_path):
    base, mos = trained_moslora()
    with torch.no_grad():
        expected = mos(input_ids=IDS).logits
        assert (expected - base(input_ids=IDS).logits).abs().max() > 1e-2
    save_adapter(mos, tmp_path)
    assert json.loads((tmp_path / "moslora_config.json").read_text())["init"] == "orthogonal"
    assert any(
        k.endswith("lora_mixer.weight") for k in load_file(tmp_path / "adapter_model.safetensors")
    )

    loaded = load_adapter(make_tiny_llama(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(make_tiny_llama(0), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_mixer" in n)


def test_stock_peft_drops_the_mixer_silently_which_is_why_load_adapter_exists(tmp_path):
    base, mos = trained_moslora()
    save_adapter(mos, tmp_path)
    with torch.no_grad():
        expected = mos(input_ids=IDS).logits
        stock = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path)(input_ids=IDS).logits
    assert (stock - expected).abs().max() > 1e-3  # stock PEFT: mixer silently gone


EXTRA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_extra.weight"
DROPPED_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda w: {**w, EXTRA_KEY: torch.zeros(2, 2)},
            r"1 tensor\(s\) saved in .* have no place in the model.*lora_extra",
        ),
        (
            lambda w: {k: v for k, v in w.items() if "lora_mixer" not in k},
            r"declares a MoSLoRA adapter .* hold no `lora_mixer.weight` tensor",
        ),
        (
            lambda w: {k: v for k, v in w.items() if k != DROPPED_B},
            r"1 adapter tensor\(s\) of the model are missing .*down_proj.lora_B",
        ),
    ],
    ids=["unconsumed-tensor", "mixer-lost", "missing-tensor"],
)
def test_load_adapter_refuses_adapters_that_do_not_match_the_model(tmp_path, edit, message):
    _, mos = trained_moslora()
    save_adapter(mos, tmp_path)
    weights_file = tmp_path / "adapter_model.safetensors"
    save_file(edit(load_file(weights_file)), weights_file)
    with pytest.raises(ValueError, match=message):
        load_adapter(make_tiny_llama(0), tmp_path)


def test_official_repo_lora_ab_checkpoint_loads_with_its_mixer(tmp_path):
    _, mos = trained_moslora()
    with torch.no_grad():
        expected = mos(input_ids=IDS).logits
    mos.save_pretrained(
        tmp_path
    )  # no moslora_config.json, and rename the mixer as the official repo does
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k.replace("lora_mixer", "lora_AB"): v for k, v in weights.items()},
        tmp_path / "adapter_model.safetensors",
    )
    loaded = load_adapter(make_tiny_llama(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected)


STOCK_PEFT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import PeftModel
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), sys.argv[1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor({ids})).logits
    assert not any(name.startswith("llava_moslora") for name in sys.modules)
    torch.save(logits, sys.argv[2])
    """
).format(ids=IDS.tolist())


def test_folded_adapter_in_stock_peft_subprocess_equals_moslora(tmp_path, stock_python):
    """Stock PEFT in an interpreter that never imports llava_moslora, on the same tiny LLaMA built
    there from its config."""
    base, mos = trained_moslora()
    with torch.no_grad():
        expected = mos(input_ids=IDS).logits
    save_folded(mos, tmp_path / "folded")
    saved = load_file(tmp_path / "folded" / "adapter_model.safetensors")
    assert saved and not any("mixer" in k for k in saved)
    stock_python(STOCK_PEFT_SCRIPT, str(tmp_path / "folded"), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    assert (got - base(input_ids=IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
