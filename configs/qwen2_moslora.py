"""LLaVA-1.5 on Qwen2.5-7B-Instruct with MoSLoRA: the paper's recipe with another backbone.

Everything but the LLM is `llama3_moslora.py`'s (both towers MoSLoRA r64, CLIP's layers 0-22,
665K instructions, one epoch). The LLM, its chat template (XTuner's `qwen_chat`, ChatML) and its
linear targets come from the `qwen2` entry of llava_moslora/builders/backbones.py.

XTuner publishes no projector pretrained for Qwen2.5: pretrain one first with XTuner's LLaVA
pretrain recipe pointed at this LLM (its work_dir is the path below).

    xtuner train configs/qwen2_moslora.py --deepspeed deepspeed_zero2
"""

from mmengine.config import read_base

with read_base():
    from .llama3_moslora import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
llm_name_or_path = "Qwen/Qwen2.5-7B-Instruct"
pretrained_pth = (
    "./work_dirs/llava_qwen2_5_7b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth"
)

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
__import__("llava_moslora.builders.backbones", fromlist=["use_backbone"]).use_backbone(
    globals(), "qwen2"
)
