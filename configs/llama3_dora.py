"""Ablation: DoRA (PEFT's `use_dora=True`) on both towers instead of MoSLoRA, same ranks."""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .llama3_moslora import *

model.llm_lora.update(type=LoraConfig, use_dora=True)
model.visual_encoder_lora.update(type=LoraConfig, use_dora=True)
