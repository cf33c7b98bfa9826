"""QMoSLoRA: MoSLoRA on a 4-bit NF4 double-quant base, on CPU (bitsandbytes >= 0.49)."""

from __future__ import annotations

import pytest
import torch

from llava_moslora.moslora import merge_and_unload_dequantized
from tests.factories import load_4bit, moslora_layers, qmoslora

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 12]])


def test_4bit_layers_get_qmoslora_and_train(llama_4bit_dir):
    from llava_moslora.moslora.layers_bnb import MoSLoRALinear4bit

    model = qmoslora(llama_4bit_dir)
    layers = moslora_layers(model)
    assert len(layers) == 2 * 7 and all(isinstance(m, MoSLoRALinear4bit) for m in layers)
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    base_weight = layers[0].get_base_layer().weight
    assert base_weight.quant_type == "nf4" and base_weight.compress_statistics  # double quant

    mixers = [m.lora_mixer["default"].weight.detach().clone() for m in layers]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = IDS.clone()
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(
        (m.lora_mixer["default"].weight - b).abs().max() > 1e-4
        for m, b in zip(layers, mixers, strict=True)
    )


def test_4bit_merge_requantizes_and_unmerge_restores_exact_weights(llama_4bit_dir):
    model = qmoslora(llama_4bit_dir, init_lora_weights=False)
    layer = moslora_layers(model)[0]
    quantized = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        with pytest.warns(UserWarning, match="rounding errors"):
            model.merge_adapter()
        merged = model(input_ids=IDS).logits
        assert not torch.equal(layer.get_base_layer().weight, quantized)
        # NF4 requantization of W0 + ΔW is lossy; the outputs stay close, not equal.
        assert (merged - unmerged).abs().max() < 0.5 * (unmerged.abs().max())
        model.unmerge_adapter()
        assert torch.equal(layer.get_base_layer().weight, quantized)
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_merge_into_dequantized_copy(llama_4bit_dir, dtype, tol):
    from transformers import LlamaForCausalLM

    model = qmoslora(llama_4bit_dir, init_lora_weights=False)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        plain = merge_and_unload_dequantized(model, dtype=dtype)
        assert isinstance(plain, LlamaForCausalLM)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
        assert not hasattr(plain.config, "quantization_config") and not plain.is_quantized
        assert plain.model.layers[0].mlp.up_proj.weight.dtype == dtype
        got = plain(input_ids=IDS).logits.float()
    assert (expected - load_4bit(llama_4bit_dir)(input_ids=IDS).logits).abs().max() > 5 * tol
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_4bit_layers_stay_in_the_standard_layout_that_merges_dequantize(llama_4bit_dir):
    """bitsandbytes repacks a CPU Linear4bit's weight in place on an AVX512-BF16 CPU at its first
    eval forward without grad, into a layout `dequantize_4bit` does not read. Wrapping switches
    that off and undoes a repacking that already happened (forced here, so any CPU runs it)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    from llava_moslora.moslora.layers_bnb import keep_standard_4bit_layout

    base = load_4bit(llama_4bit_dir).model.layers[0].mlp.up_proj  # 64 -> 128
    packed_bytes = base.weight.data.clone()
    weight = dequantize_4bit(base.weight.data, base.weight.quant_state)
    base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(
        base.weight.data, base.weight.quant_state
    )
    base.support_avx512bf16_for_cpu = True
    keep_standard_4bit_layout(base)
    assert base.support_avx512bf16_for_cpu is False
    assert not base.weight.quant_state.packing_format_for_cpu
    assert torch.equal(base.weight.data, packed_bytes)
    torch.testing.assert_close(
        dequantize_4bit(base.weight.data, base.weight.quant_state), weight, atol=1e-2, rtol=0
    )  # absmax went through bf16 in the packed layout

    model = qmoslora(llama_4bit_dir)
    assert all(
        m.get_base_layer().support_avx512bf16_for_cpu is False for m in moslora_layers(model)
    )


def test_a_4bit_layer_the_cpu_kernel_dequantizes_wrongly_is_refused(llama_4bit_dir, monkeypatch):
    """Which widths bitsandbytes' CPU kernel gets wrong depends on the CPU (AVX512: multiples of
    16 that are not of 64); the probe is exact where the kernel is right, and a layer it flags is
    refused at wrapping with the width, the block size and the fixes."""
    from llava_moslora.moslora import layers_bnb

    for width in (64, 128, 192):  # whole blocks per row: right on every CPU
        assert layers_bnb.cpu_dequantizes_rows_of(width, 64, "nf4")
        assert layers_bnb.cpu_dequantizes_rows_of(width, 64, "fp4")
    monkeypatch.setattr(layers_bnb, "cpu_dequantizes_rows_of", lambda w, b, q: w != 128)
    with pytest.raises(RuntimeError, match=r"`in_features` = 128 wrongly .* block size 64") as err:
        qmoslora(llama_4bit_dir)  # down_proj reads the 128-wide MLP
    assert "llm_int8_skip_modules" in str(err.value) and "GPU" in str(err.value)
