"""LLaVA-1.5 on InternLM2-chat-7B in 4-bit NF4 with QMoSLoRA (MoSLoRA paper, Table 8, right column).

The LLM is loaded in 4-bit NF4 with double quantization (QLoRA) and adapted with QMoSLoRA at
rank 512 / alpha 256; the CLIP tower keeps MoSLoRA r64 / alpha 16. Everything else is inherited
from `llama3_moslora.py`.

    xtuner train configs/internlm2_qmoslora.py --deepspeed deepspeed_zero2
"""

import torch
from mmengine.config import read_base

with read_base():
    from ._base_.nf4_quantization import *
    from .llama3_moslora import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
llm_name_or_path = "internlm/internlm2-chat-7b"
# XTuner's llava_internlm2_chat_7b_clip_vit_large_p14_336_e1_gpu8_pretrain projector (also on the
# hub as xtuner/llava-internlm2-7b-pretrain, file iter_2181.pth).
pretrained_pth = (
    "./work_dirs/llava_internlm2_chat_7b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth"
)
llm_rank, llm_alpha = 512, 256  # Table 8; the ViT keeps r64 / alpha 16
batch_size = 16  # per device, no accumulation (Table 8)
accumulative_counts = 1
# Table 8 lists lr 2e-5 for this setting too, while XTuner's own QLoRA LLaVA recipe uses 2e-4.
# We follow the paper (inherited from llama3_moslora.py via the schedule base).

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
# The InternLM2 entry of llava_moslora/builders/backbones.py: its chat template and its linear
# layers (q, k, v fused into one `wqkv`, the MLP's w1 / w2 / w3: the paper's seven projections under
# InternLM2's names), set in every dict that names the LLM (lazy configs copy dicts on inheritance).
__import__("llava_moslora.builders.backbones", fromlist=["use_backbone"]).use_backbone(
    globals(), "internlm2"
)
model.llm.update(
    torch_dtype=torch.float16,
    quantization_config=quantization_config,  # 4-bit NF4, double quantization
)
model.llm_lora.update(r=llm_rank, lora_alpha=llm_alpha)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# One call sets what the base computed from max_epochs, warmup_ratio, batch_size and
# accumulative_counts (scheduler ends, train_cfg, loader and sampler batch, accumulation) from
# this config's values: see llava_moslora/train/schedule.py.
__import__("llava_moslora.train.schedule", fromlist=["derive_schedule"]).derive_schedule(globals())
