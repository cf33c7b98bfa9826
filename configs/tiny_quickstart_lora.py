"""The main job's LoRA baseline: `tiny_quickstart_moslora.py` with stock `peft.LoraConfig` adapters.

Same ranks, alphas, dropout, targets, data and schedule; only the layer type changes (no mixer).
"""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .tiny_quickstart_moslora import *

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model.llm_lora.type = LoraConfig
model.visual_encoder_lora.type = LoraConfig
