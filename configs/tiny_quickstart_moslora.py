"""The main job's MoSLoRA run (`scripts/offline_pipeline.sh`): `tiny_moslora.py` set up to learn.

    llava-moslora make-tiny ./tiny_quickstart --samples 2000 \
        --benchmark-rounds mcq_text,yes_no_read,short --verdict-steps 1000
    LLAVA_MOSLORA_TINY_DIR=./tiny_quickstart llava-moslora train configs/tiny_quickstart_moslora.py

The paper's adapters (Table 8: LLM rank 64 / alpha 128, ViT rank 64 / alpha 16, inherited) on the
tiny LLaVA, with what the offline ablation measured a random-init tiny model needs to learn to
read its images in a CPU budget (configs/tiny_ablation.py inherits all of it and only lowers the
ranks):
* per-module learning rates: the adapters of the LLM at `lr`, the projector and the ViT's adapters
  at 1/20 of it. With every trainable part at one high rate the tiny model collapses to the answer
  priors (it stops reading the image); the LLM's adapters alone learn to read it. The paper's
  single 2e-5 is too small to move a random toy model in a CPU budget;
* batch 8 without accumulation, 5 epochs (the main job's 2,000 images: 1,250 optimizer steps;
  with the numerics pinned to AVX2, 3 epochs left MoSLoRA's MME at 21.2 and LoRA's MMBench-CN at
  20.8, under 2.2x chance: docs/evaluation.md), and no activation checkpointing (~30 % of the step
  at this size, no memory to save).
"""

from mmengine.config import read_base
from xtuner.engine.hooks import DatasetInfoHook

with read_base():
    from .tiny_moslora import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
heldout_eval_path = f"{tiny_dir}/data/heldout_eval.json"  # read by `--eval heldout`
batch_size = 8
accumulative_counts = 1
lr = 2e-3
slow_lr_mult = 0.05  # projector and ViT adapters
max_epochs = 5  # 2,000 images / 8 per step x 5 = 1,250 optimizer steps

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model.use_activation_checkpointing = False

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper.optimizer.lr = lr
# mmengine's DefaultOptimWrapperConstructor matches these keys against parameter names
# ("projector.model.0.weight", "visual_encoder.base_model.model...lora_A.default.weight").
optim_wrapper.paramwise_cfg = dict(
    custom_keys={
        "projector": dict(lr_mult=slow_lr_mult),
        "visual_encoder": dict(lr_mult=slow_lr_mult),
    }
)
# One call sets what the base computed from max_epochs, warmup_ratio, batch_size and
# accumulative_counts (scheduler ends, train_cfg, loader and sampler batch, accumulation) from
# this config's values: see llava_moslora/train/schedule.py.
__import__("llava_moslora.train.schedule", fromlist=["derive_schedule"]).derive_schedule(globals())

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [dict(type=DatasetInfoHook, tokenizer=tokenizer)]
save_steps = 100000  # only the last checkpoint (written at the end of training)
default_hooks.checkpoint.interval = save_steps
