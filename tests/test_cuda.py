"""The same MoSLoRA / QMoSLoRA paths on a real GPU (skipped where CUDA is absent, as in CI)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from llava_moslora.moslora import merge_and_unload_dequantized, moslora_config
from tests.factories import LLAMA_TARGETS, make_tiny_llama, moslora_layers, nf4_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 12]])


def test_bf16_moslora_on_cuda_trains_merges_and_moves_devices():
    base = make_tiny_llama(0, dtype=torch.bfloat16).cuda()
    config = moslora_config(
        r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False
    )
    mos = get_peft_model(copy.deepcopy(base), config)
    ids = IDS.cuda()
    layer = moslora_layers(mos)[0]
    assert layer.lora_mixer["default"].weight.is_cuda
    loss = mos(input_ids=ids, labels=ids).loss
    loss.backward()
    assert layer.lora_mixer["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        unmerged = mos(input_ids=ids).logits
        before = layer.get_base_layer().weight.clone()
        mos.merge_adapter()
        torch.testing.assert_close(mos(input_ids=ids).logits, unmerged, atol=5e-2, rtol=5e-2)
        mos.unmerge_adapter()
        assert torch.equal(layer.get_base_layer().weight, before)
    mos.cpu()
    assert not layer.lora_mixer["default"].weight.is_cuda


def test_qmoslora_4bit_on_cuda_trains_and_merges_into_bf16(tmp_path):
    from transformers import LlamaForCausalLM

    make_tiny_llama(0).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=nf4_config(torch.bfloat16),
        torch_dtype=torch.bfloat16,
        device_map={"": 0},
    )
    mos = get_peft_model(model, moslora_config(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    ids = IDS.cuda()
    opt = torch.optim.AdamW([p for p in mos.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = mos(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.no_grad():
        expected = mos(input_ids=ids).logits.float()
        plain = merge_and_unload_dequantized(mos, dtype=torch.bfloat16)
        got = plain(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
