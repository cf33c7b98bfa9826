"""What makes two scores comparable: the protocol recorded with every score, and LLaVA-1.5's
TextVQA prompt with reference OCR tokens.

Toolkits disagree on protocol: LLaVA-1.5-7B's TextVQA is 58.2 in its paper (OCR tokens in the
prompt), 45.5 on VLMEvalKit's leaderboard and 21.9 in a local VLMEvalKit run without them; its
MMBench-CN is 22.4 by exact matching and 44.1 with a judge. So each benchmark's entry in the
results carries `protocol`:

    scorer      "exact matching" or the judge model (and its API host)
    data        the TSV's file name, md5, VLMEvalKit's listed md5 and the benchmark's version
    prompt      the prompt variant (LLaVA-1.5's, VLMEvalKit's, TextVQA with OCR tokens from FILE)
    decoding    the generation settings the predictions were made with
    vlmevalkit  the VLMEvalKit release that inferred / scored

and `report` marks a column whose rows differ in any of them (`protocol_key`).
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from .benchmarks import BENCHMARKS

EXACT_MATCHING = "exact matching"
# The fields of `protocol` that must agree for two scores of one column to be compared.
COMPARED_FIELDS = ("benchmark", "version", "md5", "scorer", "prompt", "decoding")


def vlmevalkit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ms-vlmeval {version('ms-vlmeval')}"
    except PackageNotFoundError:  # a source checkout of VLMEvalKit
        import vlmeval

        return f"vlmeval {getattr(vlmeval, '__version__', 'unknown')}"


def data_record(name: str, tsv: dict[str, str | None]) -> dict[str, Any]:
    """The `data` part of the protocol: file, md5, listed md5 and the benchmark's version."""
    return {"version": BENCHMARKS[name].version, **tsv}


def protocol_key(name: str, protocol: dict[str, Any] | None) -> tuple[str, ...]:
    """What must agree between two rows of one column, as a tuple of strings (None: unknown)."""
    protocol = protocol or {}
    data = protocol.get("data") or {}
    values = {
        "benchmark": name,
        "version": data.get("version"),
        "md5": data.get("md5"),
        "scorer": protocol.get("scorer"),
        "prompt": protocol.get("prompt"),
        "decoding": json.dumps(protocol.get("decoding"), sort_keys=True),
    }
    return tuple(str(values[field]) for field in COMPARED_FIELDS)


# ----------------------------------------------------------------------------- TextVQA with OCR
LLAVA_PROMPT_COLUMN = "llava_prompt"  # a column added to the dataset's table: the prompt verbatim


def read_llava_questions(path: str | Path) -> list[dict[str, Any]]:
    """LLaVA-1.5's TextVQA question file (`llava_textvqa_val_v051_ocr.jsonl`): one JSON object
    per line whose `text` is the prompt LLaVA asks, "QUESTION\\nReference OCR token: A, B, ...
    \\nAnswer the question using a single word or phrase."."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`--textvqa-ocr` {str(path)!r} does not exist; pass LLaVA-1.5's "
            "llava_textvqa_val_v051_ocr.jsonl (LLaVA's playground/data/eval/textvqa/)."
        )
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(
                f"{path}:{number} has no `text` string: not a LLaVA question file (each line "
                '{"question_id": ..., "image": ..., "text": "QUESTION\\nReference OCR token: ..."}).'
            )
        questions.append(record)
    return questions


def llava_prompts(data, path: str | Path) -> list[str]:
    """LLaVA-1.5's prompt for every row of a TextVQA table `data`, matched by question text.

    The question is the first line of each `text`; rows are matched in order among equal
    questions (the two files list TextVQA's val questions in the same order). A row without a
    match is an error naming it: a prompt is never guessed.
    """
    by_question: dict[str, deque[str]] = defaultdict(deque)
    for record in read_llava_questions(path):
        by_question[record["text"].split("\n", 1)[0].strip()].append(record["text"])
    prompts = []
    for index, question in zip(data["index"], data["question"], strict=True):
        queue = by_question.get(str(question).strip())
        if not queue:
            raise ValueError(
                f"`--textvqa-ocr` {str(path)!r} has no prompt for question {index} "
                f"({str(question)!r}); pass the question file of the same TextVQA split."
            )
        prompts.append(queue.popleft())
    return prompts
