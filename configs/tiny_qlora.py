"""The QLoRA baseline of `tiny_qmoslora.py`: same 4-bit tiny run, stock `peft.LoraConfig`."""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .tiny_qmoslora import *

model.llm_lora.type = LoraConfig
model.visual_encoder_lora.type = LoraConfig
