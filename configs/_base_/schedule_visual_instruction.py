"""PART 4 of the paper's visual instruction tuning (MoSLoRA paper, Table 8, LLaMA-3 + ViT column).

One epoch of AdamW at lr 2e-5, per-device batch 8 x 2 accumulation steps, linear warm-up over the
first 3 % then cosine to zero, gradients clipped at norm 1, fp16 mixed precision as in XTuner.
"""

from mmengine.optim import AmpOptimWrapper
from torch.optim import AdamW
from xtuner.engine.runner import TrainLoop

# mmengine's LinearLR and CosineAnnealingLR, with a warm-up of at least one iteration on a small
# dataset (mmengine would round it to none and refuse): llava_moslora/train/schedule.py.
from llava_moslora.train.schedule import CosineAfterWarmupLR, LinearWarmupLR

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
batch_size = 8  # per device
accumulative_counts = 2
max_epochs = 1
optim_type = AdamW
lr = 2e-5
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.03

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale="dynamic",
    dtype="float16",
)

# Warm-up and cosine are given in epochs and converted to iterations by mmengine, so they follow
# the dataset's length.
param_scheduler = [
    dict(
        type=LinearWarmupLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type=CosineAfterWarmupLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)
