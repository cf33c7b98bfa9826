"""`tiny_moslora.py` on the compositional task (llava_moslora/data/compositional.py), with the
mixer diagnostics on: the offline setting in which "does the mixer matter?" is measured.

    llava-moslora make-tiny ./tiny_comp --task compositional
    LLAVA_MOSLORA_TINY_DIR=./tiny_comp xtuner train configs/tiny_compositional_moslora.py
    llava-moslora eval-compositional configs/tiny_compositional_moslora.py \
        --checkpoint work_dirs/tiny_compositional_moslora/iter_100.pth
    llava-moslora plot-diagnostics work_dirs/tiny_compositional_moslora

Rank ablations keep s = alpha / r fixed (the paper's 2 for the LLM, 1/4 for the ViT), e.g. r=2:
    --cfg-options model.llm_lora.r=2 model.llm_lora.lora_alpha=4 \
        model.visual_encoder_lora.r=2 model.visual_encoder_lora.lora_alpha=0.5
"""

from mmengine.config import read_base
from xtuner.engine.hooks import DatasetInfoHook

from llava_moslora.train.diagnostics import MixerDiagnosticsHook

with read_base():
    from .tiny_moslora import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
data_path = f"{tiny_dir}/data/compositional.json"
image_folder = f"{tiny_dir}/data/images"
# r 8 of the tiny towers' 64 dimensions, with the paper's scales: LLM 128 / 64, ViT 16 / 64.
llm_rank, llm_alpha = 8, 16
visual_encoder_rank, visual_encoder_alpha = 8, 2
# Short answers give few loss tokens per sample: more, smaller steps at a higher rate learn the
# task within the CPU budget. 400 images / 4 per step x 2 epochs = 200 optimizer steps.
accumulative_counts = 1
lr = 5e-3
max_epochs = 2
diagnostics_interval = 20

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model.llm_lora.update(r=llm_rank, lora_alpha=llm_alpha)
model.visual_encoder_lora.update(r=visual_encoder_rank, lora_alpha=visual_encoder_alpha)
# Recomputing activations saves no memory worth having at this size and costs ~30 % of the time.
model.use_activation_checkpointing = False

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
llava_dataset.update(data_path=data_path, image_folder=image_folder)
train_dataloader.dataset = llava_dataset

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper.optimizer.lr = lr
# One call sets what the base computed from max_epochs, warmup_ratio, batch_size and
# accumulative_counts (scheduler ends, train_cfg, loader and sampler batch, accumulation) from
# this config's values: see llava_moslora/train/schedule.py.
__import__("llava_moslora.train.schedule", fromlist=["derive_schedule"]).derive_schedule(globals())

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
# The held-out accuracy (`llava-moslora eval-compositional`) replaces EvaluateChatHook's samples.
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=MixerDiagnosticsHook, interval=diagnostics_interval),
]
save_steps = 1000  # only the last checkpoint
default_hooks.checkpoint.interval = save_steps
