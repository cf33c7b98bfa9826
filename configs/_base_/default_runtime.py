"""PART 5 of XTuner's recipes, less the custom hooks (they need the tokenizer): hooks, env, logs."""

from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)

from llava_moslora.train.summary import AdapterSummaryHook

# Every checkpoint XTuner and mmengine read (`--resume`, its seed, `pretrained_pth`) goes through
# the safe loader, which reads mmengine checkpoints on torch >= 2.6 as well (see
# llava_moslora/train/compat.py). Lazy configs defer `import`s; __import__ runs now.
__import__("llava_moslora.train.compat", fromlist=["apply"]).apply()

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
save_steps = 1000
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)
log_interval = 10

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    # record the time of every iteration.
    timer=dict(type=IterTimerHook),
    # print log every `log_interval` iterations.
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=log_interval),
    # enable the parameter scheduler.
    param_scheduler=dict(type=ParamSchedulerHook),
    # save checkpoint per `save_steps`.
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit,
    ),
    # set sampler seed in distributed environment.
    sampler_seed=dict(type=DistSamplerSeedHook),
    # trainable parameters by group (LLM/ViT adapter, mixers, projector) and the mixer in use.
    adapter_summary=dict(type=AdapterSummaryHook),
)

env_cfg = dict(
    # whether to enable cudnn benchmark
    cudnn_benchmark=False,
    # set multi process parameters
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    # set distributed parameters
    dist_cfg=dict(backend="nccl"),
)

# None: mmengine's default Visualizer with a LocalVisBackend, which writes
# <work_dir>/<timestamp>/vis_data/scalars.json (one JSON line per logged iteration).
visualizer = None

log_level = "INFO"

# load from which checkpoint
load_from = None

# whether to resume training from the loaded checkpoint
resume = False

# Defaults to use random seed and disable `deterministic`
randomness = dict(seed=None, deterministic=False)

log_processor = dict(by_epoch=False)
