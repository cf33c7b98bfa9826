"""LLaVA-1.5 visual instruction tuning: any causal LM + CLIP ViT-L/14-336 (XTuner recipe).

PARTs 1-3 and the custom hooks of PART 5: towers frozen, XTuner's pretrained projector, the 665K
LLaVA-1.5 mix. No adapters here: `llama3_moslora.py` and its relatives add them to `model`.
The LLM is LLaMA-3-8B-Instruct, the paper's; a config for another family (a name of
llava_moslora/builders/backbones.py's BACKBONES) sets `llm_name_or_path` and `pretrained_pth`
and calls `use_backbone(globals(), FAMILY)`, which sets the template and the targets and
re-points every dict below that names the LLM (`vicuna_moslora.py`, `qwen2_moslora.py`).
"""

from mmengine.config import read_base
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
from xtuner.dataset.samplers import LengthGroupedSampler
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook
from xtuner.model import LLaVAModel
from xtuner.utils import PROMPT_TEMPLATE

from llava_moslora.data.dataset import CheckedLLaVADataset

with read_base():
    from .schedule_visual_instruction import *

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
llm_family = "llama3"  # backbones.BACKBONES: its template, chat tokens and linear targets
llm_name_or_path = "meta-llama/Meta-Llama-3-8B-Instruct"
visual_encoder_name_or_path = "openai/clip-vit-large-patch14-336"
# Its 24 encoder layers (llava_moslora.builders.standin.CLIP_L_336, the shape `plan` also reads), of
# which LLaVA-1.5 feeds the projector the second-to-last one's output.
visual_encoder_num_layers = __import__(
    "llava_moslora.builders.standin", fromlist=["CLIP_L_336"]
).CLIP_L_336.layers
visual_select_layer = -2
# The projector pre-trained by XTuner's
# llava_llama3_8b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain config (also on the hub as
# xtuner/llava-llama-3-8b-pretrain, file iter_2181.pth).
pretrained_pth = (
    "./work_dirs/llava_llama3_8b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth"
)

# Data
data_root = "./data/llava_data/"
data_path = data_root + "LLaVA-Instruct-150K/llava_v1_5_mix665k.json"
image_folder = data_root + "llava_images"
prompt_template = PROMPT_TEMPLATE.llama3_chat
max_length = 2048 - (336 // 14) ** 2  # 576 image tokens: 1472 text tokens
dataloader_num_workers = 4

# Evaluate the generation performance during the training
evaluation_freq = 1000
SYSTEM = ""
evaluation_images = "https://llava-vl.github.io/static/images/view.jpg"
evaluation_inputs = ["请描述一下这张照片", "Please describe this picture"]

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=llm_name_or_path,
    trust_remote_code=True,
    padding_side="right",
)

image_processor = dict(
    type=CLIPImageProcessor.from_pretrained,
    pretrained_model_name_or_path=visual_encoder_name_or_path,
    trust_remote_code=True,
)

model = dict(
    type=LLaVAModel,
    freeze_llm=True,
    freeze_visual_encoder=True,
    visual_select_layer=visual_select_layer,
    pretrained_pth=pretrained_pth,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=llm_name_or_path,
        trust_remote_code=True,
    ),
    visual_encoder=dict(
        type=CLIPVisionModel.from_pretrained,
        pretrained_model_name_or_path=visual_encoder_name_or_path,
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
# XTuner's LLaVADataset behind a data check (llava_moslora/data/check.py): missing or corrupt
# images, malformed conversations and prompts that leave no answer token within max_length stop
# the run before step 1 ("error"), or are logged and left out ("drop").
llava_dataset = dict(
    type=CheckedLLaVADataset,
    data_path=data_path,
    image_folder=image_folder,
    tokenizer=tokenizer,
    image_processor=image_processor,
    dataset_map_fn=llava_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    max_length=max_length,
    pad_image_to_square=True,
    on_bad_samples="error",  # or "drop": train on the good samples, logging the dropped ids
    decode_images=True,  # False: only check that the image files exist (faster start)
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    pin_memory=True,
    dataset=llava_dataset,
    sampler=dict(
        type=LengthGroupedSampler,
        length_property="modality_length",
        per_device_batch_size=batch_size * accumulative_counts,
    ),
    collate_fn=dict(type=default_collate_fn),
)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
# Log the dialogue periodically during the training process, optional
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        image_processor=image_processor,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        evaluation_images=evaluation_images,
        system=SYSTEM,
        prompt_template=prompt_template,
    ),
]
