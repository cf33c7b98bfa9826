"""Ablation: MoSLoRA with the mixer initialised orthogonal instead of Kaiming-uniform (Table 3)."""

from mmengine.config import read_base

with read_base():
    from .llama3_moslora import *

model.llm_lora.mixer_init = "orthogonal"
model.visual_encoder_lora.mixer_init = "orthogonal"
