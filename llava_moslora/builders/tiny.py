"""Tiny, randomly initialised HF models built from config objects: nothing is downloaded.

Shaped like the real towers (LLaMA-3 attention with grouped KV heads, a CLIP ViT) so every code
path that touches q/k/v/o/gate/up/down or the ViT's q/k/v/out_proj/fc1/fc2 runs, at toy size.
"""

from __future__ import annotations

import torch

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def tiny_llama(
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
):
    """A 2-layer LlamaForCausalLM (hidden 32, 4 heads, 2 KV heads), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_clip_vision(seed: int = 0, *, image_size: int = 28, patch_size: int = 14, layers: int = 2):
    """A `layers`-deep CLIPVisionModel (hidden 32), 28x28 images: (28 // 14) ** 2 = 4 patches."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    return CLIPVisionModel(config).eval()
