"""LLaVA-1.5 on its own backbone, Vicuna-7B v1.5, with MoSLoRA: the paper's recipe otherwise.

Everything but the LLM is `llama3_moslora.py`'s (both towers MoSLoRA r64, CLIP's layers 0-22,
665K instructions, one epoch). The LLM, its chat template (XTuner's `vicuna`, LLaVA-1.5's own
conversation format) and its linear targets come from the `vicuna` entry of
llava_moslora/builders/backbones.py.

    xtuner train configs/vicuna_moslora.py --deepspeed deepspeed_zero2
"""

from mmengine.config import read_base

with read_base():
    from .llama3_moslora import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
llm_name_or_path = "lmsys/vicuna-7b-v1.5"
# LLaVA-1.5's pretrained projector as XTuner publishes it (xtuner/llava-v1.5-7b-xtuner-pretrain,
# file iter_2181.pth), from XTuner's llava_v15_7b pretrain config.
pretrained_pth = "./work_dirs/llava_v15_7b_pretrain/iter_2181.pth"

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
__import__("llava_moslora.builders.backbones", fromlist=["use_backbone"]).use_backbone(
    globals(), "vicuna"
)
