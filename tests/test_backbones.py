"""Any HF causal LM as LLaVA's LLM: the backbone table, and its two recipes beyond the paper's.

Vicuna-7B v1.5 (LLaVA-1.5's own backbone) and Qwen2.5-7B-Instruct each get a stand-in at test
widths (the family's layout, names and chat tokens; random weights; offline), one training step
through their config, and an hf-llava export that stock transformers' LlavaForConditionalGeneration
reads with the training model's logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_moslora.builders.backbones import BACKBONES, backbone, use_backbone
from tests.factories import (
    IMAGE_TOKEN_INDEX,
    assert_one_step_trains,
    llava_model_logits,
    max_diff,
    randomise_trained_tensors,
    save_mmengine_checkpoint,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FP32_ATOL = 1e-4  # merged (W0 + ΔW) x against W0 x + ΔW x in float32: summation order only


def test_an_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"`llm_family` should be one of llama3, vicuna, qwen2, "):
        backbone("gpt5")
    with pytest.raises(ValueError, match="`use_backbone` needs the config's llm_name_or_path"):
        use_backbone({"tokenizer": {}, "model": {}, "llava_dataset": {}}, "qwen2")


@pytest.mark.parametrize("family", list(BACKBONES))
def test_each_family_builds_at_test_widths_with_its_own_linear_layer_names(family):
    from llava_moslora.builders.backbones import build_llm, llm_config

    entry = BACKBONES[family]
    model = build_llm(llm_config(entry.tiny, entry.tiny.layers), torch.float32)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    assert set(entry.targets) <= names
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert linear - set(entry.targets) == {"lm_head" if family != "internlm2" else "output"}


# stand-in, config, the text model LLaVA holds, whether q/k/v carry a bias
RECIPES = [
    ("vicuna-7b", "vicuna_moslora", "llama", False),
    ("qwen2.5-7b", "qwen2_moslora", "qwen2", True),
]


@pytest.mark.parametrize(("standin_name", "config_name", "model_type", "qkv_bias"), RECIPES)
def test_new_backbone_recipe_trains_a_step_and_exports_to_stock_llava(
    standin_name, config_name, model_type, qkv_bias, tmp_path
):
    from mmengine.config import Config
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from xtuner.registry import BUILDER

    from llava_moslora.builders.standin import make_standin, path_overrides
    from llava_moslora.export.exporter import export
    from llava_moslora.train import cpu_shims

    config = CONFIGS / f"{config_name}.py"
    paths = make_standin(tmp_path / "standin", standin_name, tiny=True, samples=2)
    cpu_shims.apply()  # what the tiny configs install when parsed; GPU runs need none
    cfg = Config.fromfile(str(config))
    overrides = path_overrides(config, paths)
    cfg.merge_from_dict(overrides)
    family = BACKBONES[cfg.llm_family]

    # Build and train one step through the recipe, unchanged but for its paths.
    dataset = BUILDER.build(cfg.train_dataloader.dataset)
    torch.manual_seed(0)
    llava = BUILDER.build(cfg.model).train()
    assert llava.llm.config.model_type == model_type
    attention = llava.llm.get_base_model().model.layers[0].self_attn
    assert (attention.q_proj.base_layer.bias is not None) == qkv_bias
    adapted = [
        m for m in llava.llm.modules() if hasattr(m, "lora_mixer") and "default" in m.lora_mixer
    ]
    assert len(adapted) == len(family.targets) * family.tiny.layers
    assert_one_step_trains(llava, dataset[0], adapted[0].lora_mixer["default"].weight)

    # One image question as XTuner lays it out with the family's template.
    llava.eval()
    randomise_trained_tensors(
        llava
    )  # B, mixers, projector far from init: the export must carry them
    tokenizer = BUILDER.build(cfg.tokenizer)
    prompt = cfg.prompt_template.INSTRUCTION.format(input="<image>\nWhat shape is it?", round=1)
    head, tail = prompt.split("<image>")
    ids = (
        tokenizer.encode(head)
        + [IMAGE_TOKEN_INDEX]
        + tokenizer.encode(tail, add_special_tokens=False)
    )
    image = Image.open(sorted(paths["images"].glob("*.png"))[0]).convert("RGB")
    pixels = BUILDER.build(cfg.image_processor)(image, return_tensors="pt")["pixel_values"]
    expected = llava_model_logits(llava, {"input_ids": torch.tensor([ids]), "pixel_values": pixels})
    with llava.llm.disable_adapter(), llava.visual_encoder.disable_adapter():
        plain = llava_model_logits(
            llava, {"input_ids": torch.tensor([ids]), "pixel_values": pixels}
        )
    assert (
        max_diff(expected, plain) > 0.1
    )  # the adapters matter: the equality below means something

    checkpoint = save_mmengine_checkpoint(llava, tmp_path / "iter_1.pth")
    export(
        checkpoint, str(config), "hf-llava", tmp_path / "hf", dtype="float32", cfg_options=overrides
    )
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert model.config.text_config.model_type == model_type
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    batch = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    is_text = batch["input_ids"][0] != model.config.image_token_index
    vocab = expected.shape[-1]
    assert logits.shape[1] == expected.shape[1]  # one image id became the image's patches
    assert max_diff(logits[0, is_text, :vocab], expected[0, is_text]) < FP32_ATOL
    assert max_diff(logits[..., :vocab], expected) < FP32_ATOL
