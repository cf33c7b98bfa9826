"""LLaVA-1.5 (LLaMA-3-8B-Instruct + CLIP ViT-L/14-336) visual instruction tuning with MoSLoRA.

The paper's setting (MoSLoRA, arXiv 2406.11909, Sec. 4.2 and Table 8): both towers frozen and
adapted with MoSLoRA, XTuner's pretrained projector trained in full, 665K LLaVA-1.5 instructions,
one epoch.

    xtuner train configs/llama3_moslora.py --deepspeed deepspeed_zero2
"""

from mmengine.config import read_base

from llava_moslora.moslora import moslora_config

with read_base():
    from ._base_.default_runtime import *
    from ._base_.llava_clip_vit_l_336 import *
    from ._base_.schedule_visual_instruction import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Table 8, LLM / visual encoder: rank 64 / 64, alpha 128 / 16. The mixer starts Kaiming-uniform
# (moslora_config's default, the paper's) and is learned.
llm_rank, llm_alpha = 64, 128
visual_encoder_rank, visual_encoder_alpha = 64, 16
lora_dropout = 0.05
# Every linear layer of the LLM: the paper's seven projections, as the family names them.
llm_target_modules = list(
    __import__("llava_moslora.builders.backbones", fromlist=["BACKBONES"])
    .BACKBONES[llm_family]
    .targets
)
# CLIP's counterparts (attention q/k/v/out, MLP fc1/fc2): all its linear layers, which is also what
# XTuner picks when target_modules is None.
visual_encoder_target_modules = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# ... in the layers that feed the hidden state LLaVA reads: 0-22 of 24 (visual_select_layer=-2).
# CLIP's last layer runs after it, so adapters there would never receive a gradient. The paper
# adapts every layer; for its exact targets pass
#   --cfg-options model.visual_encoder_lora.layers_to_transform=None
visual_encoder_layers_to_transform = __import__(
    "llava_moslora.builders.vision_layers", fromlist=["layers_feeding"]
).layers_feeding(visual_encoder_num_layers, visual_select_layer)

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model.update(
    llm_lora=dict(
        type=moslora_config,
        r=llm_rank,
        lora_alpha=llm_alpha,
        lora_dropout=lora_dropout,
        target_modules=llm_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    ),
    visual_encoder_lora=dict(
        type=moslora_config,
        r=visual_encoder_rank,
        lora_alpha=visual_encoder_alpha,
        lora_dropout=lora_dropout,
        target_modules=visual_encoder_target_modules,
        layers_to_transform=visual_encoder_layers_to_transform,
        bias="none",
    ),
)
