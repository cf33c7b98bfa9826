"""The plain-LoRA baseline of `tiny_moslora.py`: identical run, stock `peft.LoraConfig` adapters.

Run it like tiny_moslora.py:

    LLAVA_MOSLORA_TINY_DIR=./tiny xtuner train configs/tiny_lora.py
"""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .tiny_moslora import *

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
# Same ranks, alphas, dropout and targets; only the layer type changes (no mixer).
model.llm_lora.type = LoraConfig
model.visual_encoder_lora.type = LoraConfig
