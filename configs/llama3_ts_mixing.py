"""Ablation: TS-Mixing (paper Eq. 3), the fixed butterfly mixer [[I, I], [I, I]] on both towers."""

from mmengine.config import read_base

with read_base():
    from .llama3_moslora import *

model.llm_lora.update(mixer_init="butterfly", mixer_trainable=False)
model.visual_encoder_lora.update(mixer_init="butterfly", mixer_trainable=False)
