"""The plain-LoRA baseline of `tiny_compositional_moslora.py`: same run, stock `peft.LoraConfig`.

LLAVA_MOSLORA_TINY_DIR=./tiny_comp xtuner train configs/tiny_compositional_lora.py
"""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .tiny_compositional_moslora import *

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model.llm_lora.type = LoraConfig
model.visual_encoder_lora.type = LoraConfig
