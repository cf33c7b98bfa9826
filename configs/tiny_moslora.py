"""`llama3_moslora.py` on the tiny LLaVA that `llava-moslora make-tiny DIR` writes: CPU, offline.

    llava-moslora make-tiny ./tiny
    LLAVA_MOSLORA_TINY_DIR=./tiny xtuner train configs/tiny_moslora.py   # ./tiny is the default
    xtuner train configs/tiny_moslora.py --deepspeed deepspeed_zero2      # or deepspeed_zero3

XTuner's DeepSpeed presets run here unchanged, in float32 in one process (gloo); the CPU shims
below say why they are needed. A checkpoint is then a DeepSpeed folder, iter_N.pth/: read it with
`llava_moslora.train.checkpoints.load_trained_state` (float32; XTuner's guess_load_checkpoint
gives float16).

Same recipe, adapters, template and schedule shape; only paths, sizes, the iteration count, the
optimizer wrapper (mmengine's AmpOptimWrapper refuses CPU) and CPU runtime settings change.
"""

from mmengine.config import read_base
from mmengine.optim import OptimWrapper

with read_base():
    from .llama3_moslora import *

# Lazy-import configs turn `import` statements into deferred references, so what must run while
# the config is parsed goes through __import__, which they leave alone. The CPU shims are no-ops
# where CUDA is present; see llava_moslora/train/cpu_shims.py for what each one fixes.
__import__("llava_moslora.train.cpu_shims", fromlist=["apply"]).apply()

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
tiny_dir = __import__("os").environ.get("LLAVA_MOSLORA_TINY_DIR", "./tiny")
llm_name_or_path = f"{tiny_dir}/llm"
visual_encoder_name_or_path = f"{tiny_dir}/clip"
pretrained_pth = f"{tiny_dir}/projector/iter_0.pth"
data_path = f"{tiny_dir}/data/tiny_llava.json"
image_folder = f"{tiny_dir}/data/images"
max_length = 512 - (56 // 14) ** 2  # tiny LLaMA's 512 positions, 16 image tokens
# The tiny CLIP's 3 layers: adapt 0-1, the two that feed visual_select_layer=-2 (see
# llama3_moslora.py; `model.visual_encoder_lora.layers_to_transform=None` adapts all three).
visual_encoder_num_layers = __import__(
    "llava_moslora.builders.make_tiny", fromlist=["TINY_CLIP_LAYERS"]
).TINY_CLIP_LAYERS
visual_encoder_layers_to_transform = __import__(
    "llava_moslora.builders.vision_layers", fromlist=["layers_feeding"]
).layers_feeding(visual_encoder_num_layers, visual_select_layer)
dataloader_num_workers = 0

batch_size = 4  # x 2 accumulation steps, as in the paper
max_epochs = 2
# The paper's 2e-5 moves a randomly initialised toy model too little to see in two epochs.
lr = 2e-3

save_steps = 40
log_interval = 5
evaluation_freq = 40
evaluation_images = f"{image_folder}/000000.png"
evaluation_inputs = ["How many shapes are there?", "What colour are the shapes?"]

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
# The base's dicts are copies (lazy configs do not keep aliases), so each gets the new paths.
tokenizer.pretrained_model_name_or_path = llm_name_or_path
image_processor.pretrained_model_name_or_path = visual_encoder_name_or_path
model.pretrained_pth = pretrained_pth
model.llm.pretrained_model_name_or_path = llm_name_or_path
model.visual_encoder.pretrained_model_name_or_path = visual_encoder_name_or_path
model.visual_encoder_lora.layers_to_transform = visual_encoder_layers_to_transform

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
llava_dataset.update(
    data_path=data_path,
    image_folder=image_folder,
    tokenizer=tokenizer,
    image_processor=image_processor,
    max_length=max_length,
)
train_dataloader.update(
    dataset=llava_dataset,
    num_workers=dataloader_num_workers,
    pin_memory=False,
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# mmengine's AmpOptimWrapper refuses CPU; the plain wrapper keeps optimizer, clipping, accumulation.
optim_wrapper.type = OptimWrapper
optim_wrapper.pop("loss_scale")  # AmpOptimWrapper's own arguments
optim_wrapper.pop("dtype")
optim_wrapper.optimizer.lr = lr
# One call sets what the base computed from max_epochs, warmup_ratio, batch_size and
# accumulative_counts (scheduler ends, train_cfg, loader and sampler batch, accumulation) from
# this config's values: see llava_moslora/train/schedule.py.
__import__("llava_moslora.train.schedule", fromlist=["derive_schedule"]).derive_schedule(globals())

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
# The inherited hooks are copies: each gets the tiny tokenizer, EvaluateChatHook also the tiny
# image processor and the tiny questions, on a local image (the default is a URL), answered short.
custom_hooks[0].tokenizer = tokenizer  # DatasetInfoHook
custom_hooks[1].update(  # EvaluateChatHook
    tokenizer=tokenizer,
    image_processor=image_processor,
    every_n_iters=evaluation_freq,
    evaluation_inputs=evaluation_inputs,
    evaluation_images=evaluation_images,
    max_new_tokens=16,
)
default_hooks.logger.interval = log_interval
default_hooks.checkpoint.interval = save_steps
env_cfg.dist_cfg.backend = "gloo"  # NCCL needs GPUs
# Used only when distributed: DDP over CPU processes takes no device ids, and with the paper's
# targets (`model.visual_encoder_lora.layers_to_transform=None`) the ViT's last layer, above
# visual_select_layer=-2, is adapted but gets no gradient. DDP with unused parameters cannot run
# XTuner's reentrant activation checkpointing ("marked as ready twice"), so a 2-process run turns
# it off:
#   NPROC_PER_NODE=2 xtuner train configs/tiny_moslora.py \
#       --cfg-options model.use_activation_checkpointing=False
model_wrapper_cfg = dict(device_ids=None, find_unused_parameters=True)
