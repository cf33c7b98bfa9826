"""LLaVA-1.5's prompt layouts: what the training data asks and what the eval model sends.

LLaVA-1.5's 665K mix teaches the answer formats its benchmarks ask for: a multiple-choice question
answered by the option's letter, a yes/no question answered "Yes"/"No", a question answered by one
word. The synthetic data (synthetic.py) writes its benchmark-format rounds with these functions and
the VLMEvalKit model (llava_moslora.eval.model) builds its prompts with them, so a model is asked
at evaluation exactly as it was taught; VLMEvalKit's generic "Please select the correct answer"
is not what LLaVA-1.5 saw.
"""

from __future__ import annotations

from collections.abc import Mapping

IMAGE_TOKEN = "<image>"  # xtuner.utils.DEFAULT_IMAGE_TOKEN
MCQ_INSTRUCTION = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_SUFFIX = " Please answer yes or no."


def language_of(text: str) -> str:
    """The MCQ instruction's language for a benchmark row: `cn` when `text` (its question and
    options) holds a CJK character (MMBench-CN), else `en`."""
    return "cn" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def mcq_prompt(question: str, options: Mapping[str, str], lang: str) -> str:
    """`question`, one `X. option` line per (letter, text) of `options`, then LLaVA-1.5's MCQ
    instruction in `lang` ("en" or "cn")."""
    if lang not in MCQ_INSTRUCTION:
        raise ValueError(f"`lang` should be one of {list(MCQ_INSTRUCTION)}, got {lang!r}")
    lines = [question, *(f"{letter}. {text}" for letter, text in options.items())]
    return "\n".join([*lines, MCQ_INSTRUCTION[lang]])


def short_answer_prompt(question: str) -> str:
    """`question` then LLaVA-1.5's single-word instruction (also what yes/no questions get)."""
    return f"{question}\n{SHORT_ANSWER_INSTRUCTION}"
