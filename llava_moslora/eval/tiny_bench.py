"""Tiny offline benchmarks in the TSV formats VLMEvalKit reads, drawn like the synthetic data.

`write_tiny_bench(DIR)` writes, into a folder used as $LMUData (VLMEvalKit's data root):

  TinyShapes_MMBench_EN.tsv / _CN.tsv   MMBench's layout: index, question, hint, A-D, answer,
        category, l2-category, split, image (base64 PNG). Each question appears once per rotation
        of its options, at index + k * 1e6 with the image field naming the original index, as in
        MMBench's own TSVs, so VLMEvalKit's circular scoring applies ("mmbench" in the name). One
        leaf category per L2 ability (all six), each answerable from the drawn scene.
  TinyShapes_MME.tsv    MME's layout: index, image, question, answer (Yes/No), category,
        image_path; two questions per image (one "Yes", one "No"), so MME's acc+ (both right)
        applies. Categories color, count, existence, position: MME's own perception names.
  TinyShapes_TextVQA.tsv   TextVQA's layout: index, image, question, answer (a list of 10 human
        answers, here all equal), scored with VQA accuracy.

Scenes, questions and option texts come from `llava_moslora.data.synthetic` (a 2 x 2 grid holding
one to four shapes of one colour), whose training data has rounds in these same formats; the
images here are drawn from a random stream of their own, never the training data's. The records returned carry each row's Scene and the correct answer text, so a test can
build a model that answers from the known scene.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from llava_moslora.data import synthetic
from llava_moslora.data.drawing import CELLS, COLOURS, COUNT_WORDS, SHAPES, draw
from llava_moslora.data.items import OPTION_LETTERS

from .benchmarks import TINY_MMBENCH_CN, TINY_MMBENCH_EN, TINY_MME, TINY_TEXTVQA

CIRCULAR_OFFSET = 1_000_000  # MMBench's index offset between rotations of one question


@dataclass(frozen=True)
class TinyRecord:
    """One TSV row: what was asked about which scene, and the right answer in words."""

    dataset: str
    index: int
    scene: synthetic.Scene
    question: str
    answer_text: str  # the correct option's text / "Yes" or "No" / the short answer


def image_key(image: Image.Image) -> str:
    """A key for an image's pixels (PNG bytes differ after VLMEvalKit re-encodes them)."""
    image = image.convert("RGB")
    return hashlib.md5(image.tobytes() + repr(image.size).encode()).hexdigest()


def _b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------- MMBench-style MCQ
# The questions and option texts are the training data's (synthetic.MCQ_QUESTIONS / OPTION_TEXTS):
# the benchmark asks in the formats the model was taught, about scenes it has not seen.
# (question kind, MMBench leaf category, MMBench L2 ability): one kind per L2 ability.
_MCQ_KINDS = (
    ("colour", "image_colour", "coarse_perception"),
    ("shape", "object_shape", "finegrained_perception (instance-level)"),
    ("count", "object_count", "finegrained_perception (cross-instance)"),
    ("warmth", "colour_temperature", "attribute_reasoning"),
    ("rows", "row_comparison", "relation_reasoning"),
    ("parity", "count_parity", "logic_reasoning"),
)


def _mcq_rows(name: str, lang: str, per_ability: int, rng: random.Random):
    rows, records = [], []
    index = 0
    for kind, category, l2 in _MCQ_KINDS:
        words = synthetic.OPTION_TEXTS[lang][kind]
        question = synthetic.MCQ_QUESTIONS[kind][lang]
        for _ in range(per_ability):
            scene = synthetic.random_scene(rng)
            image = draw(scene.objects, rng)
            truth = synthetic.mcq_truth(scene, kind)
            options = synthetic.mcq_options(scene, kind, rng)  # the right one among them
            # One row per rotation: rotation k shifts every option k letters (MMBench circular).
            for k in range(len(options)):
                rotated = options[k:] + options[:k]
                row_index = index + k * CIRCULAR_OFFSET
                row = {
                    "index": row_index,
                    "question": question,
                    "hint": None,
                    "answer": OPTION_LETTERS[rotated.index(truth)],
                    "category": category,
                    "l2-category": l2,
                    "split": "dev",
                    "image": _b64png(image) if k == 0 else str(index),
                }
                row.update({OPTION_LETTERS[i]: words[opt] for i, opt in enumerate(rotated)})
                rows.append(row)
                records.append(TinyRecord(name, row_index, scene, question, words[truth]))
            index += 1
    return rows, records


# ----------------------------------------------------------------------------- MME-style yes/no
_MME_KINDS = tuple(synthetic.YES_NO_QUESTIONS)  # color, count, existence, position


def _mme_rows(per_category: int, rng: random.Random):
    rows, records = [], []
    index = 0
    for kind in _MME_KINDS:
        for n in range(per_category):
            scene = synthetic.random_scene(rng)
            while kind == "position" and scene.count == len(CELLS):
                scene = synthetic.random_scene(rng)
            image = draw(scene.objects, rng)
            pair = synthetic.yes_no_pair(scene, kind, rng)
            first = index
            for question, answer in zip(pair, synthetic.YES_NO_ANSWERS, strict=True):
                rows.append(
                    {
                        "index": index,
                        # MME's TSV stores the image once per pair; the second row names the first.
                        "image": _b64png(image) if index == first else str(first),
                        "question": question,
                        "answer": answer,
                        "category": kind,
                        "image_path": f"{kind}/{n:03d}.png",
                    }
                )
                records.append(TinyRecord(TINY_MME, index, scene, question, answer))
                index += 1
    return rows, records


# ----------------------------------------------------------------------------- TextVQA-style
_VQA_KINDS = tuple((kind, synthetic.QUESTIONS[kind][0]) for kind in synthetic.SHORT_ANSWER_KINDS)


def _vqa_rows(per_kind: int, rng: random.Random):
    rows, records = [], []
    index = 0
    for kind, question in _VQA_KINDS:
        for _ in range(per_kind):
            scene = synthetic.random_scene(rng)
            image = draw(scene.objects, rng)
            text = synthetic.short_answer(scene, kind)
            rows.append(
                {
                    "index": index,
                    "image": _b64png(image),
                    "question": question,
                    "answer": repr([text] * 10),  # TextVQA: ten annotators' answers
                }
            )
            records.append(TinyRecord(TINY_TEXTVQA, index, scene, question, text))
            index += 1
    return rows, records


def write_tiny_bench(
    out_dir: str | Path, *, seed: int = 0, per_category: int = 2
) -> dict[str, list[TinyRecord]]:
    """Write the four tiny TSVs into `out_dir` (use it as $LMUData); return their records.

    Sizes with the default `per_category=2`: 12 MMBench questions per language (2 per ability,
    2-4 rotations each), 16 MME questions (8 image pairs), 6 TextVQA questions.
    """
    if not isinstance(per_category, int) or per_category < 1:
        raise ValueError(f"`per_category` should be a positive integer, got {per_category!r}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Its own random stream, not the training data's: with random.Random(seed) the first image
    # drawn here would be, pixel for pixel, training image 000000 of `make-tiny --seed` the same.
    rng = random.Random(f"tiny_bench/{seed}")
    built = {
        TINY_MMBENCH_EN: _mcq_rows(TINY_MMBENCH_EN, "en", per_category, rng),
        TINY_MMBENCH_CN: _mcq_rows(TINY_MMBENCH_CN, "cn", per_category, rng),
        TINY_MME: _mme_rows(per_category, rng),
        TINY_TEXTVQA: _vqa_rows(per_category, rng),
    }
    records = {}
    for name, (rows, recs) in built.items():
        pd.DataFrame(rows).to_csv(out_dir / f"{name}.tsv", sep="\t", index=False)
        records[name] = recs
    return records


def has_tiny_bench(data_root: str | Path) -> bool:
    """Whether `data_root` already holds all four tiny TSVs."""
    from .benchmarks import TINY

    return all((Path(data_root) / f"{name}.tsv").is_file() for name in TINY)


def chance_scores(data_root: str | Path) -> dict[str, float]:
    """Table 5 column -> the expected score of a uniform random guesser on the tiny TSVs in
    `data_root`, on the table's scale (MME: total / MME_SCALE), computed from the rows themselves:

    * MMBench (circular): a question counts only if every rotation is right, so a guesser among
      n options scores (1/n) ** rotations on it (1/4 for two options, 1/256 for four);
    * MME: each category's score is acc + acc+ (both questions of an image right): 50 + 25;
    * TextVQA: one over the number of answers the question's kind has (4 colours, 3 shapes, 4
      counts).
    """
    from .benchmarks import BENCHMARKS

    root = Path(data_root)
    chance: dict[str, float] = {}
    for name in (TINY_MMBENCH_EN, TINY_MMBENCH_CN):
        rows = pd.read_csv(root / f"{name}.tsv", sep="\t")
        per_question = []
        for _, group in rows.groupby(rows["index"] % CIRCULAR_OFFSET):
            options = group.iloc[0][list(OPTION_LETTERS)].notna().sum()
            per_question.append((1 / options) ** len(group))
        chance[BENCHMARKS[name].column] = float(100 * sum(per_question) / len(per_question))
    mme = pd.read_csv(root / f"{TINY_MME}.tsv", sep="\t")
    chance[BENCHMARKS[TINY_MME].column] = BENCHMARKS[TINY_MME].table_score(
        (50 + 25) * mme["category"].nunique()
    )
    answers = {
        "colour": COLOURS,
        "shape": SHAPES,
        "count": COUNT_WORDS,
    }
    answers_of = {question: len(answers[kind]) for kind, question in _VQA_KINDS}
    vqa = pd.read_csv(root / f"{TINY_TEXTVQA}.tsv", sep="\t")
    chance[BENCHMARKS[TINY_TEXTVQA].column] = (
        100 * sum(1 / answers_of[q] for q in vqa["question"]) / len(vqa)
    )
    return chance
