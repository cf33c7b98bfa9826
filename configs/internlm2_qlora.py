"""The QLoRA baseline of `internlm2_qmoslora.py`: same 4-bit run, stock `peft.LoraConfig`."""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .internlm2_qmoslora import *

model.llm_lora.type = LoraConfig
model.visual_encoder_lora.type = LoraConfig
