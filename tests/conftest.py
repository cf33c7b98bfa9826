"""Tiny models built from config objects (nothing is downloaded) and shared helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_moslora.model.tiny import LLAMA_TARGETS as _LLAMA
from llava_moslora.model.tiny import tiny_clip_vision, tiny_llama

LLAMA_TARGETS = list(_LLAMA)
# CLIP's adapted linears inside one encoder layer, as PEFT names them, in the order CLIPAttention
# and CLIPMLP define them (and named_parameters lists them).
CLIP_LAYER_LINEARS = (
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.q_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def make_mlp(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden_size: int = 32):
    return tiny_llama(seed, dtype=dtype, hidden_size=hidden_size)


# Layer widths 64 and 128: bitsandbytes' AVX512 CPU kernel mis-dequantizes rows that are a multiple
# of 16 but not of its 64-wide blocks (llava_moslora.moslora.layers_bnb), so 4-bit tests use these.
HIDDEN_4BIT = 64


def make_tiny_clip_vision(seed: int = 0):
    return tiny_clip_vision(seed)


def copy_lora_weights(src, dst, adapter: str = "default") -> None:
    """Copy lora_A / lora_B of every adapted layer from `src` to the same layers of `dst`."""
    src_layers = dict(src.named_modules())
    with torch.no_grad():
        for name, module in dst.named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                other = src_layers[name]
                module.lora_A[adapter].weight.copy_(other.lora_A[adapter].weight)
                module.lora_B[adapter].weight.copy_(other.lora_B[adapter].weight)


def moslora_layers(model, adapter: str = "default"):
    return [m for m in model.modules() if hasattr(m, "lora_mixer") and adapter in m.lora_mixer]


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """`import vlmeval.vlm` switches autograd off process-wide (see llava_moslora.eval's
    import_vlmeval); tests that import VLMEvalKit directly must not leak that into later tests."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def vlmevalkit_mcq_prompts(tsv, tmp_path, monkeypatch) -> list[str]:
    """Build `tsv` with VLMEvalKit itself (its name unknown, so read as a custom MCQ set, from a
    copy in a fresh $LMUData) and return the text of every row's prompt."""
    import shutil

    from llava_moslora.eval import import_vlmeval

    root = tmp_path / "LMUData"
    root.mkdir()
    shutil.copy(tsv, root / "my_mcq_set.tsv")
    monkeypatch.setenv("LMUData", str(root))
    dataset = import_vlmeval("vlmeval.dataset").build_dataset("my_mcq_set")
    assert type(dataset).__name__ == "CustomMCQDataset"
    prompts = []
    for _, row in dataset.data.iterrows():
        message = dataset.build_prompt(row)
        assert [part["type"] for part in message] == ["image", "text"]
        prompts.append(message[1]["value"])
    return prompts
