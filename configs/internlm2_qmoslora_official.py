"""The official repository's InternLM2 QMoSLoRA recipe, beside the paper's `internlm2_qmoslora.py`.

The official config (wutaiqiang/MoSLoRA, `visual_instruction_tuning/kaiming_mix_lora_llava_
internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu4_finetune.py`) disagrees with the
paper's Table 8 in two places, and only those change here:

* lr 2e-4 (Table 8: 2e-5; 2e-4 is also XTuner's own QLoRA LLaVA recipe's);
* the CLIP tower gets plain LoRA r64 / alpha 16 (`lora_use_mixer=False` there): no mixer.

The rest is the same in both: the NF4 double-quantized InternLM2-chat-7B with QMoSLoRA r512 / alpha
256 on all its linear layers, batch 16 per device without accumulation, one epoch. (The official
config also adapts CLIP's last layer, which LLaVA never reads; like every config here, this one
leaves it out: its adapters would get no gradient.)

    xtuner train configs/internlm2_qmoslora_official.py --deepspeed deepspeed_zero2
    llava-moslora ablate --config configs/internlm2_qmoslora_official.py ...
"""

from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .internlm2_qmoslora import *

lr = 2e-4
optim_wrapper.optimizer.lr = lr
model.visual_encoder_lora.type = LoraConfig
