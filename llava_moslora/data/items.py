"""Held-out multiple-choice items and VLMEvalKit's MCQ TSV: what both offline tasks evaluate on.

The shapes task's held-out set (`synthetic.write_heldout`) and the compositional task's
(`compositional.write_task`) are lists of `EvalItem`s, written as a JSON list of dicts and as a
VLMEvalKit multiple-choice TSV; `llava_moslora.eval.heldout` scores the JSON ones.
"""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .drawing import Obj

OPTION_LETTERS = "ABCD"  # VLMEvalKit's MCQ TSV columns; MMBench's at most four options


@dataclass(frozen=True)
class EvalItem:
    """One held-out multiple-choice item; what the eval code turns into VLMEvalKit rows.

    `image` is relative to the folder of the items' JSON; `options` are the answers of the
    category in a fixed order; `answer` is the correct option text, `answer_letter` its letter.
    """

    index: int
    image: str
    question: str
    answer: str
    answer_letter: str
    options: tuple[str, ...]
    category: str
    l2_category: str
    scene: tuple[Obj, ...] = ()  # what the image shows: lets anyone re-derive the answer
    split: str = "test"

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EvalItem:
        scene = tuple(Obj(*obj) if isinstance(obj, list) else Obj(**obj) for obj in row["scene"])
        return cls(**{**row, "options": tuple(row["options"]), "scene": scene})


def read_eval_items(path: str | Path) -> list[EvalItem]:
    return [EvalItem.from_dict(row) for row in json.loads(Path(path).read_text())]


def write_mcq_tsv(items: Iterable[EvalItem], image_root: str | Path, out: str | Path) -> Path:
    """VLMEvalKit's multiple-choice TSV: index, image (base64 PNG), question, A-D, answer, ...

    Unused option columns stay empty (pandas reads them as NaN, which VLMEvalKit skips). Give the
    file a name VLMEvalKit does not know, so it is read as a custom MCQ set and never downloaded.
    """
    columns = ["index", "image", "question", *OPTION_LETTERS, "answer", "category"]
    columns += ["l2-category", "split"]
    out = Path(out)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(columns)
        for item in items:
            image = base64.b64encode((Path(image_root) / item.image).read_bytes()).decode()
            options = list(item.options) + [""] * (len(OPTION_LETTERS) - len(item.options))
            writer.writerow(
                [item.index, image, item.question, *options, item.answer_letter]
                + [item.category, item.l2_category, item.split]
            )
    return out
