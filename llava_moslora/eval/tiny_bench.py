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

Scenes come from `llava_moslora.data.synthetic` (a 2 x 2 grid holding one to four shapes of one
colour). The records returned carry each row's Scene and the correct answer text, so a test can
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

from .benchmarks import TINY_MMBENCH_CN, TINY_MMBENCH_EN, TINY_MME, TINY_TEXTVQA

CIRCULAR_OFFSET = 1_000_000  # MMBench's index offset between rotations of one question
WARM = ("red", "yellow")


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
_EN = {
    "colour": dict(zip(synthetic.COLOURS, synthetic.COLOURS, strict=True)),
    "shape": dict(zip(synthetic.SHAPES, synthetic.SHAPES, strict=True)),
    "count": dict(zip(range(1, 5), synthetic.COUNT_WORDS, strict=True)),
    "warmth": {"warm": "warm", "cool": "cool"},
    "rows": {"top": "the top row", "bottom": "the bottom row", "same": "both rows equally"},
    "parity": {"even": "even", "odd": "odd"},
}
_CN = {
    "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"},
    "shape": {"circle": "圆形", "square": "正方形", "triangle": "三角形"},
    "count": {1: "一个", 2: "两个", 3: "三个", 4: "四个"},
    "warmth": {"warm": "暖色", "cool": "冷色"},
    "rows": {"top": "上面一行", "bottom": "下面一行", "same": "两行一样多"},
    "parity": {"even": "偶数", "odd": "奇数"},
}
# (question kind, MMBench leaf category, MMBench L2 ability, English question, Chinese question)
_MCQ_KINDS = (
    ("colour", "image_colour", "coarse_perception", "What colour are the shapes?", "图中形状是什么颜色？"),
    ("shape", "object_shape", "finegrained_perception (instance-level)", "What shape is drawn?", "图中画的是什么形状？"),
    ("count", "object_count", "finegrained_perception (cross-instance)", "How many shapes are there?", "图中有几个形状？"),
    ("warmth", "colour_temperature", "attribute_reasoning", "Is the colour of the shapes warm or cool?", "形状的颜色是暖色还是冷色？"),
    ("rows", "row_comparison", "relation_reasoning", "Which row of the grid holds more shapes?", "网格的哪一行形状更多？"),
    ("parity", "count_parity", "logic_reasoning", "Is the number of shapes even or odd?", "形状的数量是偶数还是奇数？"),
)  # fmt: skip


def _mcq_truth(scene: synthetic.Scene, kind: str):
    if kind == "colour":
        return scene.colour
    if kind == "shape":
        return scene.shape
    if kind == "count":
        return scene.count
    if kind == "warmth":
        return "warm" if scene.colour in WARM else "cool"
    if kind == "rows":
        top = sum(1 for c in scene.cells if c < 2)
        bottom = scene.count - top
        return "top" if top > bottom else "bottom" if bottom > top else "same"
    if kind == "parity":
        return "even" if scene.count % 2 == 0 else "odd"
    raise ValueError(f"`kind` should be one of {[k[0] for k in _MCQ_KINDS]}, got {kind!r}")


def _mcq_rows(name: str, lang: str, per_ability: int, rng: random.Random):
    words = _EN if lang == "en" else _CN
    rows, records = [], []
    index = 0
    for kind, category, l2, q_en, q_cn in _MCQ_KINDS:
        for _ in range(per_ability):
            scene = synthetic.random_scene(rng)
            image = synthetic.draw(scene, rng)
            truth = _mcq_truth(scene, kind)
            # At most four options (MMBench's), the right one among them, in a seeded order.
            choices = list(words[kind])
            distractors = [c for c in choices if c != truth]
            rng.shuffle(distractors)
            options = [truth, *distractors[:3]]
            rng.shuffle(options)
            question = q_en if lang == "en" else q_cn
            # One row per rotation: rotation k shifts every option k letters (MMBench circular).
            for k in range(len(options)):
                rotated = options[k:] + options[:k]
                row_index = index + k * CIRCULAR_OFFSET
                row = {
                    "index": row_index,
                    "question": question,
                    "hint": None,
                    "answer": "ABCD"[rotated.index(truth)],
                    "category": category,
                    "l2-category": l2,
                    "split": "dev",
                    "image": _b64png(image) if k == 0 else str(index),
                }
                row.update({"ABCD"[i]: words[kind][opt] for i, opt in enumerate(rotated)})
                rows.append(row)
                records.append(TinyRecord(name, row_index, scene, question, words[kind][truth]))
            index += 1
    return rows, records


# ----------------------------------------------------------------------------- MME-style yes/no
_MME_KINDS = ("color", "count", "existence", "position")


def _mme_pair(scene: synthetic.Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """A question whose answer is Yes and one whose answer is No, about the same image."""
    suffix = " Please answer yes or no."
    if kind == "color":
        other = rng.choice([c for c in synthetic.COLOURS if c != scene.colour])
        ask = "Are the shapes {} in the image?" + suffix
        return ask.format(scene.colour), ask.format(other)
    if kind == "count":
        other = rng.choice([n for n in range(1, 5) if n != scene.count])
        ask = "Are there exactly {} shapes in the image?" + suffix
        return ask.format(synthetic.COUNT_WORDS[scene.count - 1]), ask.format(
            synthetic.COUNT_WORDS[other - 1]
        )
    if kind == "existence":
        other = rng.choice([s for s in synthetic.SHAPES if s != scene.shape])
        ask = "Is there a {} in the image?" + suffix
        return ask.format(scene.shape), ask.format(other)
    if kind == "position":
        empty = [i for i in range(len(synthetic.CELLS)) if i not in scene.cells]
        if not empty:  # every cell is filled: no "No" question exists about positions
            raise ValueError("a position pair needs a scene with an empty cell")
        ask = "Is there a shape in the {} cell of the grid?" + suffix
        full = synthetic.CELLS[rng.choice(scene.cells)]
        return ask.format(full), ask.format(synthetic.CELLS[rng.choice(empty)])
    raise ValueError(f"`kind` should be one of {list(_MME_KINDS)}, got {kind!r}")


def _mme_rows(per_category: int, rng: random.Random):
    rows, records = [], []
    index = 0
    for kind in _MME_KINDS:
        for n in range(per_category):
            scene = synthetic.random_scene(rng)
            while kind == "position" and scene.count == len(synthetic.CELLS):
                scene = synthetic.random_scene(rng)
            image = synthetic.draw(scene, rng)
            pair = _mme_pair(scene, kind, rng)
            first = index
            for question, answer in zip(pair, ("Yes", "No"), strict=True):
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
_VQA_KINDS = (
    ("colour", "What colour are the shapes?"),
    ("shape", "What shape is drawn?"),
    ("count", "How many shapes are there?"),
)


def _vqa_rows(per_kind: int, rng: random.Random):
    rows, records = [], []
    index = 0
    for kind, question in _VQA_KINDS:
        for _ in range(per_kind):
            scene = synthetic.random_scene(rng)
            image = synthetic.draw(scene, rng)
            truth = _mcq_truth(scene, kind)
            text = synthetic.COUNT_WORDS[truth - 1] if kind == "count" else truth
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
    rng = random.Random(seed)
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
