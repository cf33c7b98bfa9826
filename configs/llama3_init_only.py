"""Control: the Kaiming mixer folded into A at init, then plain LoRA (a frozen identity mixer).

If this matches MoSLoRA, the gain came from the initialisation, not from learning the mixer.
"""

from mmengine.config import read_base

with read_base():
    from .llama3_moslora import *

model.llm_lora.init_only = True
model.visual_encoder_lora.init_only = True
