"""Two families of questions about the shapes task's images: one to pretrain on, one to adapt to.

`make-tiny --pretrain` (llava_moslora/builders/pretrain.py) trains every weight of the tiny LLaVA on
family A until it reads colours and shapes; the adapters are then trained on family B, whose
question kinds and phrasings the base has never seen, and scored on both (B: what was learned,
A: what was forgotten).

    family A   colour, shape        "What colour are the shapes?"      -> "red"
                                    "Which shape do you see?"          -> "circle"
    family B   count                "How many objects does the picture show?" -> "three"

The images are the shapes task's (synthetic.Scene: one shape in one colour in one to four cells),
each family drawn from its own random stream. Every question is asked in LLaVA-1.5's short-answer
format, after one free-form round of the same family; held-out items come in two splits drawn
from separate streams, `val` (for choosing a learning rate) and `test` (for the reported score),
with every answer of a kind equally frequent so that a model that ignores the image scores
chance.

    OUT/family_a.json, family_a_images/        training conversations (LLaVA JSON)
    OUT/family_a_val.json, family_a_test.json  held-out `EvalItem`s, images in family_a_<split>_images/
    OUT/family_b...                            the same for family B
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from .drawing import CELLS, COLOURS, COUNT_WORDS, SHAPES
from .items import OPTION_LETTERS, EvalItem
from .prompts import short_answer_prompt
from .synthetic import (
    QUESTIONS,
    Scene,
    answer,
    as_turns,
    draw_matching,
    write_conversations,
)

SPLITS = ("val", "test")


@dataclass(frozen=True)
class Family:
    """A set of question kinds: per kind its phrasings, its answer options for the short-answer round, and the free-form question and answer kind of
    `synthetic.answer` it is paired with."""

    name: str
    questions: dict[str, tuple[str, ...]]  # kind -> its phrasings
    options: dict[str, tuple[str, ...]]
    free_form: dict[str, tuple[str, str]]  # kind -> (question, synthetic.answer kind)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.questions)


FAMILY_A = Family(
    name="a",
    questions={"colour": QUESTIONS["colour"], "shape": QUESTIONS["shape"]},
    options={"colour": tuple(COLOURS), "shape": SHAPES},
    free_form={
        "colour": (QUESTIONS["colour"][0], "colour"),
        "shape": (QUESTIONS["shape"][0], "shape"),
    },
)
# A new kind, and new words for it ("objects", "picture"): nothing of family A's text. Count only:
# family B once also asked yes/no position questions ("Is the top left cell occupied?"), which no
# adapter learned (issue 29: variant means 0.500-0.554 over all 20 tables of the 2026-12-03
# ablation, 9 of 20 exactly 0.500; the base's own 0.50; chance 0.5), so half of every score was
# noise around chance (docs/ablation.md).
FAMILY_B = Family(
    name="b",
    questions={
        "count": ("How many objects does the picture show?", "What is the number of objects?"),
    },
    options={"count": COUNT_WORDS},
    free_form={"count": ("Tell me how many objects the picture shows.", "count")},
)
FAMILIES = {family.name: family for family in (FAMILY_A, FAMILY_B)}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"`family` should be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def short_answer(scene: Scene, kind: str) -> str:
    """The one-word answer of a family's `kind` about `scene`."""
    if kind == "colour":
        return scene.colour
    if kind == "shape":
        return scene.shape
    if kind == "count":
        return COUNT_WORDS[scene.count - 1]
    raise ValueError(f"`kind` should be one of colour, shape, count, got {kind!r}")


def conversation(
    family: Family, scene: Scene, rng: random.Random, short_rounds: int = 2
) -> list[dict[str, str]]:
    """One free-form round and `short_rounds` short-answer rounds of `family`, the image first."""
    kind = rng.choice(family.kinds)
    question, answer_kind = family.free_form[kind]
    rounds = [(question, answer(scene, answer_kind))]
    for _ in range(short_rounds):
        kind = rng.choice(family.kinds)
        question = rng.choice(family.questions[kind])
        rounds.append((short_answer_prompt(question), short_answer(scene, kind)))
    rng.shuffle(rounds)
    return as_turns(rounds)


def write_dataset(
    out_dir: str | Path, family: str, *, samples: int, seed: int = 0, image_size: int = 112
) -> Path:
    """`samples` training conversations of `family` on new images: OUT/family_<name>.json."""
    spec = family_of(family)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"`samples` should be a positive integer, got {samples!r}")
    out_dir = Path(out_dir)
    return write_conversations(
        out_dir / f"family_{spec.name}.json",
        out_dir / f"family_{spec.name}_images",
        samples,
        random.Random(f"{seed}-family-{spec.name}-train"),
        lambda scene, rng: conversation(spec, scene, rng),
        image_size,
    )


def write_heldout(
    out_dir: str | Path,
    family: str,
    split: str,
    *,
    items: int,
    seed: int = 0,
    image_size: int = 112,
) -> Path:
    """`items` held-out short-answer `EvalItem`s of `family` on new images: OUT/family_<name>_<split>.json.

    Kinds alternate; within a kind the right answer cycles through its options, so every answer is
    equally frequent. Each split has
    its own random stream: `val` and `test` are different pictures.
    """
    spec = family_of(family)
    if split not in SPLITS:
        raise ValueError(f"`split` should be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(items, bool) or not isinstance(items, int) or items < len(spec.kinds):
        raise ValueError(
            f"`items` should be an integer >= {len(spec.kinds)} (one per kind), got {items!r}"
        )
    out_dir = Path(out_dir)
    folder = f"family_{spec.name}_{split}_images"
    (out_dir / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-family-{spec.name}-{split}")
    rows = []
    for index in range(items):
        kind = spec.kinds[index % len(spec.kinds)]
        turn = index // len(spec.kinds)  # the how-many-th item of this kind
        options = spec.options[kind]
        truth = options[turn % len(options)]
        # The phrasing changes slowest, so that no phrasing goes with one answer.
        phrasing = (turn // len(options)) % len(spec.questions[kind])
        image = f"{folder}/{index:06d}.png"
        answer_of = partial(short_answer, kind=kind)
        scene = draw_matching(rng, answer_of, truth, out_dir / image, image_size)
        item = EvalItem(
            index=index,
            image=image,
            question=short_answer_prompt(spec.questions[kind][phrasing]),
            answer=truth,
            answer_letter=OPTION_LETTERS[options.index(truth)],
            options=options,
            category=kind,
            l2_category=f"family_{spec.name}",
            scene=scene.objects,
            split=split,
        )
        rows.append(asdict(item))
    path = out_dir / f"family_{spec.name}_{split}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def write_task(
    out_dir: str | Path,
    *,
    samples: int,
    seed: int = 0,
    val_items: int,
    test_items: int,
) -> dict[str, Path]:
    """Both families' training data and their val / test items under `out_dir`; their paths,
    keyed `family_a`, `family_a_val`, `family_a_test`, `family_b`, ..."""
    paths = {}
    for name in FAMILIES:
        paths[f"family_{name}"] = write_dataset(out_dir, name, samples=samples, seed=seed)
        for split, count in (("val", val_items), ("test", test_items)):
            paths[f"family_{name}_{split}"] = write_heldout(
                out_dir, name, split, items=count, seed=seed
            )
    return paths


def corpus() -> Iterator[str]:
    """Every question and answer of both families: the text a tokenizer for them must cover."""
    for family in FAMILIES.values():
        for kind, phrasings in family.questions.items():
            for phrasing in phrasings:
                yield short_answer_prompt(phrasing)
            yield from family.options[kind]
        for question, _ in family.free_form.values():
            yield question
    for shape in SHAPES:
        for colour in COLOURS:
            for mask in range(1, 2 ** len(CELLS)):
                cells = tuple(i for i in range(len(CELLS)) if mask >> i & 1)
                scene = Scene(shape=shape, colour=colour, cells=cells)
                for family in FAMILIES.values():
                    for _, kind in family.free_form.values():
                        yield answer(scene, kind)
