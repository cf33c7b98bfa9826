"""A merged LLaVA in transformers' own `LlavaForConditionalGeneration` layout (4.52+).

XTuner's `pth_to_hf --save-format huggingface` writes the pre-4.52 key layout
(`language_model.model.*`), so the model is assembled here from the merged towers:

    XTuner LLaVAModel                         LlavaForConditionalGeneration
    llm.model (LlamaModel, Qwen2Model, ...) -> model.language_model
    llm.lm_head                         ->    lm_head
    visual_encoder (CLIPVisionModel)    ->    model.vision_tower
    projector.model.0 / act / .2        ->    model.multi_modal_projector.linear_1 / act / linear_2
    hidden_states[visual_select_layer]  ->    vision_feature_layer (-2)
    [:, 1:] (CLS dropped)               ->    vision_feature_select_strategy "default"

Images: XTuner splices the (patches, hidden) image features in place of ONE IMAGE_TOKEN_INDEX
(-200) id; HF's processor instead expands `<image>` into (image_size // patch_size) ** 2 copies of
a real token id, whose embeddings `LlavaModel` overwrites with the same features. The embedding
sequences, hence the logits, are then identical position for position. `<image>` is added to the
tokenizer (and the embeddings resized) when the tokenizer lacks it; its own embedding row is never
read, as every `<image>` position is overwritten.
"""

from __future__ import annotations

from typing import Any

from torch import nn

IMAGE_TOKEN = "<image>"  # xtuner.utils.DEFAULT_IMAGE_TOKEN, LlavaProcessor's default


def chat_template(template: dict[str, Any], image_token: str = IMAGE_TOKEN) -> str:
    """A Jinja chat template that lays out messages as XTuner's PROMPT_TEMPLATE `template` does.

    XTuner's prompt for an image question is INSTRUCTION.format(input="<image>\\n" + question),
    after SYSTEM.format(system=...) when the system prompt is not empty; an answer is followed by
    SUFFIX (and SEP). The INSTRUCTION already ends with the assistant header, so the generation
    prompt is part of every user turn. Message contents may be strings or HF's list of
    {"type": "image"} / {"type": "text", "text": ...} items (images first, as XTuner places them).
    """

    def literal(text: str) -> str:
        return "{% raw %}" + text + "{% endraw %}" if text else ""

    def split(text: str, field: str) -> tuple[str, str]:
        before, sep, after = text.partition("{" + field + "}")
        if not sep:
            raise ValueError(
                f"The prompt template's text {text!r} has no `{{{field}}}` placeholder to put the "
                "message into."
            )
        return before, after

    def with_round(text: str) -> str:
        # INSTRUCTION may number the rounds ("{round}"): the count of user turns so far.
        pieces = text.split("{round}")
        return "{{ ns.round }}".join(literal(p) for p in pieces)

    system_before, system_after = split(template.get("SYSTEM", "{system}"), "system")
    user_before, user_after = split(template["INSTRUCTION"], "input")
    answer_end = literal(template.get("SUFFIX", ""))
    if not template.get("SUFFIX_AS_EOS", False):
        answer_end += "{{ eos_token }}"
    answer_end += literal(template.get("SEP", ""))
    content = (
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for item in message['content'] if item['type'] == 'image' -%}"
        + literal(image_token + "\n")
        + "{%- endfor -%}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endfor -%}"
        "{%- endif -%}"
    )
    return (
        "{%- set ns = namespace(round=0) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if message['content'] -%}"
        + literal(system_before)
        + content
        + literal(system_after)
        + "{%- endif -%}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- set ns.round = ns.round + 1 -%}"
        + with_round(user_before)
        + content
        + with_round(user_after)
        + "{%- else -%}"
        + content
        + answer_end
        + "{%- endif -%}"
        "{%- endfor -%}"
    )


def _add_image_token(tokenizer) -> int:
    """The id of `<image>` in `tokenizer`, added as a special token when missing."""
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True
        )
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


# CLIPImageProcessor settings that LlavaImageProcessor takes as they are.
_IMAGE_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
# What LlavaForConditionalGeneration.forward / generate take from the tokenizer: a LLaMA tokenizer
# that also returns token_type_ids makes the standard `generate(**processor(...))` call fail.
TOKENIZER_INPUTS = ["input_ids", "attention_mask"]


def llava_image_processor(clip_processor, *, pad_to_square: bool):
    """transformers' LlavaImageProcessor with `clip_processor`'s settings, padding as training did.

    With `pad_to_square` (the dataset's `pad_image_to_square`), `do_pad=True` pads a non-square
    image to a square of its long side, centred, in the colour int(255 * image_mean), before the
    CLIP resize and crop: LLaVA's / XTuner's `expand2square(image, mean)` exactly. A plain
    CLIPImageProcessor would centre-crop instead and cut off what training saw.
    """
    from transformers import LlavaImageProcessor

    settings = {k: v for k, v in clip_processor.to_dict().items() if k in _IMAGE_PROCESSOR_FIELDS}
    return LlavaImageProcessor(do_pad=pad_to_square, **settings)


def _generate_ready(tokenizer) -> None:
    """Make the tokenizer (and its saved config) return only what the model's generate takes."""
    tokenizer.model_input_names = list(TOKENIZER_INPUTS)
    tokenizer.init_kwargs["model_input_names"] = list(TOKENIZER_INPUTS)  # saved with it


def _transformers_ships(llm: nn.Module) -> bool:
    """Whether `llm` is a transformers causal LM (not remote code) that LLaVA can hold: a
    `.model` body and an `.lm_head`, and a config type transformers' Auto classes know."""
    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = getattr(llm, "config", None)
    return (
        isinstance(llm, PreTrainedModel)
        and type(llm).__module__.startswith("transformers.")
        and getattr(config, "model_type", None) in CONFIG_MAPPING
        and hasattr(llm, "model")
        and hasattr(llm, "lm_head")
    )


def build_hf_llava(
    llm: nn.Module,
    visual_encoder: nn.Module,
    projector: nn.Module,
    tokenizer,
    image_processor,
    *,
    visual_select_layer: int,
    prompt_template: dict[str, Any] | None,
    pad_image_to_square: bool,
):
    """(LlavaForConditionalGeneration, LlavaProcessor) from merged towers and XTuner's projector.

    `llm` must be a causal LM of an architecture transformers ships (LLaMA, Qwen2, ...), with
    `.model` and `.lm_head` (plain, merged), and
    `visual_encoder` a CLIPVisionModel; `tokenizer` gets `<image>` added if it lacks it.
    `image_processor` (XTuner's CLIPImageProcessor) becomes a LlavaImageProcessor that pads to
    square when training did (`pad_image_to_square`).
    """
    from accelerate import init_empty_weights
    from transformers import (
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if not _transformers_ships(llm):
        raise ValueError(
            f"`--to hf-llava` needs an LLM whose architecture transformers itself ships (LLaMA, "
            f"Vicuna, Qwen2, ...: LlavaForConditionalGeneration builds its text model from the "
            f"config), but the config builds a {type(llm).__name__}, which stock transformers "
            "cannot rebuild. Use `--to merged-xtuner` for this backbone."
        )
    if not isinstance(visual_encoder, CLIPVisionModel):
        raise ValueError(
            f"`--to hf-llava` needs a CLIPVisionModel visual encoder, but the config builds a "
            f"{type(visual_encoder).__name__}. Use `--to merged-xtuner` instead."
        )
    pconfig = projector.config
    if pconfig.depth != 2:
        raise ValueError(
            f"`projector_depth` should be 2 for `--to hf-llava` (LLaVA's projector is "
            f"linear_1, act, linear_2) but the model's is {pconfig.depth}. Use "
            "`--to merged-xtuner` instead."
        )

    image_token_id = _add_image_token(tokenizer)
    if image_token_id >= llm.get_input_embeddings().num_embeddings:
        # HF's default mean resizing: the new rows follow the old embeddings' distribution. The
        # input row is always overwritten by image features; the lm_head row gives `<image>` an
        # ordinary, not a dominant, logit.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if tokenizer.pad_token is None:  # LLaMA-3 has none; batched processor calls need one
        tokenizer.pad_token = tokenizer.eos_token

    vconfig = visual_encoder.config
    patches = (vconfig.image_size // vconfig.patch_size) ** 2
    llm.config.use_cache = True  # LLaVAModel switches it off for training
    config = LlavaConfig(
        vision_config=vconfig.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act=pconfig.hidden_act,
        vision_feature_select_strategy="default",  # drop CLS, as LLaVAModel's [:, 1:]
        vision_feature_layer=visual_select_layer,
        image_seq_length=patches,
        multimodal_projector_bias=pconfig.bias,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    with init_empty_weights():  # no random init of billions of weights about to be replaced
        model = LlavaForConditionalGeneration(config)
    linear_1, linear_2 = projector.model[0], projector.model[2]
    pairs = [
        (model.model.language_model, llm.model),
        (model.lm_head, llm.lm_head),
        (model.model.vision_tower, visual_encoder),
        (model.model.multi_modal_projector.linear_1, linear_1),
        (model.model.multi_modal_projector.linear_2, linear_2),
    ]
    for target, source in pairs:
        target.load_state_dict(source.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = llm.generation_config
    model.eval()

    template = chat_template(prompt_template) if prompt_template else None
    _generate_ready(tokenizer)
    processor = LlavaProcessor(
        image_processor=llava_image_processor(image_processor, pad_to_square=pad_image_to_square),
        tokenizer=tokenizer,
        patch_size=vconfig.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS; "default" drops it again: `patches` tokens
        chat_template=template,
    )
    return model, processor
