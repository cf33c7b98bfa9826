"""The LoRA baseline of `llama3_moslora.py`: same run, stock `peft.LoraConfig` (no mixer)."""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .llama3_moslora import *

model.llm_lora.type = LoraConfig
model.visual_encoder_lora.type = LoraConfig
