"""The offline "does the mixer matter?" setting: `tiny_moslora.py` at rank 8, scored on new images.

    llava-moslora make-tiny ./tiny_ablation --samples 4000 --benchmark-rounds short,short
    LLAVA_MOSLORA_TINY_DIR=./tiny_ablation llava-moslora ablate --config configs/tiny_ablation.py \
        --seeds 5 --work-dir work_dirs/ablation

Each run is scored by `--eval heldout`: the held-out short-answer items that make-tiny writes
(llava_moslora.data.synthetic.write_heldout: colour, shape and count on new images, answers
balanced, each option scored by its log-likelihood). The untrained model scores chance there.

The data: 4,000 images, each with one or two free-form rounds and two short-answer rounds (the
held-out items' format): with make-tiny's default mix of multiple-choice and yes/no rounds, or
fewer images, rank-8 LoRA stayed at chance (docs/ablation.md has the measurements).

What differs from tiny_quickstart_moslora.py (whose rates and batch it inherits), and why: 3
epochs of its 4,000 images (the main job's 5 of 2,000 would be 2,500 steps);
rank 8 of the towers' 64 dimensions (the paper's scales kept: LLM alpha/r = 2, ViT 1/4), so that
the adapter is low-rank, as it is at 8B, and the mixer has room to differ from no mixer; and the
mixer diagnostics hook.
"""

from mmengine.config import read_base
from xtuner.engine.hooks import DatasetInfoHook

from llava_moslora.train.diagnostics import MixerDiagnosticsHook

with read_base():
    from .tiny_quickstart_moslora import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
llm_rank, llm_alpha = 8, 16
visual_encoder_rank, visual_encoder_alpha = 8, 2
diagnostics_interval = 50
max_epochs = 3  # 4,000 images / 8 per step x 3 = 1,500 optimizer steps (the main job trains 5)

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model.llm_lora.update(r=llm_rank, lora_alpha=llm_alpha)
model.visual_encoder_lora.update(r=visual_encoder_rank, lora_alpha=visual_encoder_alpha)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
__import__("llava_moslora.train.schedule", fromlist=["derive_schedule"]).derive_schedule(globals())

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=MixerDiagnosticsHook, interval=diagnostics_interval),
]
