"""A LLaVA-format sample as training tokens, without XTuner: what the hf engine trains on.

XTuner's LLaVADataset turns `{"image": ..., "conversations": [{"from": "human"|"gpt", ...}]}` into
token ids and labels in three steps (llava_map_fn, template_map_fn, encode_fn). The hf engine
runs where XTuner does not install (transformers 5), so the same layout is written here from its
rules, and tests/test_hf_engine.py checks it id for id against XTuner's on the tiny data:

    turn i (from 1)   [BOS] INSTRUCTION.format(input=human text, round=i)                   labels -100
                      answer + SUFFIX [EOS unless SUFFIX_AS_EOS]                            labels = ids
                      SEP                                                                    labels -100
    the image         "<image>" moved to the front of its human turn ("<image>\\n" + text), and
                      the text on each side of it encoded separately around one IMAGE_PLACEHOLDER
    BOS               before the first turn, and again after any turn that ends with EOS
    leading gpt turns dropped; human turns without an answer after them dropped
    truncation        to `max_length` ids (the configs leave room for the image's patch tokens)

`pad_to_square` is LLaVA-1.5's image padding (`pad_image_to_square=True`): CLIP's processor would
otherwise crop the centre and cut off what lies outside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from .prompts import IMAGE_TOKEN

IMAGE_PLACEHOLDER = -200  # xtuner.utils.IMAGE_TOKEN_INDEX: one id standing for the image's patches
IGNORE_INDEX = -100  # labels that carry no loss (torch's cross-entropy default)


def pad_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """`image` centred on a square of its long side, filled with `background` (RGB 0-255)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def turns(conversations: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(human text, gpt answer) pairs, `<image>` moved to the front of its human turn.

    Leading gpt turns (answers to nothing) are dropped, human turns in a row are joined, and a
    trailing human turn (a question without its answer) is dropped, as LLaVA-1.5's loader does.
    """
    while conversations and conversations[0]["from"] == "gpt":
        conversations = conversations[1:]
    pairs: list[tuple[str, str]] = []
    prompt = ""
    for message in conversations:
        text = message["value"]
        if message["from"] == "human":
            if IMAGE_TOKEN in text:
                text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
            prompt += text
        elif message["from"] == "gpt":
            pairs.append((prompt, text))
            prompt = ""
        else:
            raise ValueError(
                f"`from` should be 'human' or 'gpt' but the value passed is {message['from']!r}"
            )
    return pairs


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def encode_conversation(
    conversations: Sequence[Mapping[str, str]],
    tokenizer: Any,
    template: Mapping[str, Any],
    max_length: int,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one sample; see the module docstring for the layout.

    LLaVA samples carry no system prompt, so `template["SYSTEM"]` is not used.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    needs_bos = True
    eos_is_suffix = template.get("SUFFIX_AS_EOS", False)
    for round_, (prompt, answer) in enumerate(turns(conversations), start=1):
        text = template["INSTRUCTION"].format(input=prompt, round=round_)
        before, found, after = text.partition(IMAGE_TOKEN)
        ids = _encode(tokenizer, before)
        if found:
            ids += [IMAGE_PLACEHOLDER, *_encode(tokenizer, after)]
        if needs_bos:
            ids = [tokenizer.bos_token_id, *ids]
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
        answer_ids = _encode(tokenizer, answer + template.get("SUFFIX", ""))
        if not eos_is_suffix:
            answer_ids.append(tokenizer.eos_token_id)
        needs_bos = not eos_is_suffix
        input_ids += answer_ids
        labels += answer_ids
        sep = _encode(tokenizer, template.get("SEP", ""))
        input_ids += sep
        labels += [IGNORE_INDEX] * len(sep)
    return input_ids[:max_length], labels[:max_length]
