r"""A compositional offline task on which "does the mixer matter?" has an answer that can be measured.

`synthetic.py`'s scenes hold one shape in one colour: a tiny model learns them from global image
statistics. Here each image holds 2 to 4 objects, each with its own colour and shape, in distinct
cells of the 2 x 2 grid, and each question binds attributes to each other or to a position:

    category   l2-category  example                                       answers        chance
    colour_at  attribute    What colour is the shape in the top left?     4 colours      1/4
    shape_at   attribute    What shape is in the bottom right?            3 shapes       1/3
    count      counting     How many red shapes are there?                zero..three    1/4
    exists     binding      Is there a red triangle?                      yes / no       1/2
    where      spatial      Where is the blue circle?                     4 cells        1/4

Answers are one or two words ("red", "two", "top left"), the options of a multiple-choice item are
all answers of its category in a fixed order, and the questions are drawn answer-first: a category's
answer is picked uniformly, then a question with that answer is found in the scene. So every
answer of a category is equally frequent and chance (the accuracy of any text-only model, the
untrained one included) is exactly 1 / (number of options); see `CHANCE`.

Why it is a fair test of the adapter:

* The answers need the image: the same question text gets every answer of its category across
  scenes (tested), and answers are balanced, so the question alone gives chance.
* It needs capacity where the adapters are: the question decides *which* image tokens matter
  ("top left", "red", "triangle"), which the frozen LLM must learn to route with its adapted
  attention and MLP; a rank-1 or rank-2 adapter has measurably too little room for that.
* Held-out scenes are disjoint from training scenes: a scene is its set of (cell, shape, colour)
  objects, and no evaluation scene occurs in the training set (tested), so accuracy measures
  generalisation over scenes, not recall of drawn images. (Jitter alone would not make a repeated
  scene a new one.)
* The negatives of `exists` are hard: where the scene allows, the asked colour and shape are both
  present but on different objects, so it cannot be solved without binding colour to shape.

Files (`write_task`), next to the training JSON in LLaVA format that XTuner's LLaVADataset reads:

    DIR/compositional.json          training, LLaVA-1.5 layout, 1-3 question rounds per image
    DIR/images/*.png                training images
    DIR/compositional_eval.json     held-out items: a JSON list of dicts (see `EvalItem`)
    DIR/eval_images/*.png
    DIR/compositional_eval.tsv      the same items as a VLMEvalKit multiple-choice TSV

`llava_moslora.eval.heldout.score_items` scores each option of an item by its log-likelihood
under a LLaVAModel, the cheap and exact way to evaluate a tiny model without generation; the
VLMEvalKit path reads the TSV.

The binding this task asks for (attributes to positions, hard negatives) is beyond the tiny model
in a CPU budget: it learns each category's answer prior, not to read the image. So the measured
ablation uses the shapes task's held-out items (configs/tiny_ablation.py), and this task stays for
larger models and budgets; docs/ablation.md has the measurements. The slow test in
tests/test_compositional.py is a strict xfail that will say when training here beats chance.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from .drawing import CELLS, COLOURS, SHAPES, Obj, draw
from .items import OPTION_LETTERS, EvalItem, write_mcq_tsv
from .prompts import IMAGE_TOKEN

COUNT_ANSWERS = ("zero", "one", "two", "three")
YES_NO = ("yes", "no")
# Every answer of a category, in the order the multiple-choice options list them.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour_at": tuple(COLOURS),
    "shape_at": SHAPES,
    "count": COUNT_ANSWERS,
    "exists": YES_NO,
    "where": CELLS,
}
L2_CATEGORY = {
    "colour_at": "attribute",
    "shape_at": "attribute",
    "count": "counting",
    "exists": "binding",
    "where": "spatial",
}
CATEGORIES = tuple(ANSWERS)
CHANCE = {category: 1 / len(answers) for category, answers in ANSWERS.items()}

TRAIN_JSON = "compositional.json"
EVAL_JSON = "compositional_eval.json"
EVAL_TSV = "compositional_eval.tsv"


Scene = tuple[Obj, ...]  # sorted by cell: a scene's identity, used to keep evaluation disjoint


def random_scene(rng: random.Random, min_objects: int = 2, max_objects: int = 4) -> Scene:
    count = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(len(CELLS)), count))
    return tuple(Obj(cell, rng.choice(SHAPES), rng.choice(list(COLOURS))) for cell in cells)


# -- questions, derived from the scene -------------------------------------------------------------


def questions_with_answer(scene: Scene, category: str, answer: str) -> list[str]:
    """Every question of `category` whose answer in `scene` is `answer` (maybe none)."""
    if category == "colour_at":
        return [
            f"What colour is the shape in the {CELLS[o.cell]}?" for o in scene if o.colour == answer
        ]
    if category == "shape_at":
        return [f"What shape is in the {CELLS[o.cell]}?" for o in scene if o.shape == answer]
    if category == "count":
        wanted = COUNT_ANSWERS.index(answer)
        return [
            f"How many {colour} shapes are there?"
            for colour in COLOURS
            if sum(o.colour == colour for o in scene) == wanted
        ]
    if category == "exists":
        present = {(o.colour, o.shape) for o in scene}
        if answer == "yes":
            return [f"Is there a {c} {s}?" for c, s in sorted(present)]
        colours, shapes = {o.colour for o in scene}, {o.shape for o in scene}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # Hard negatives first: colour and shape both in the scene, on different objects.
        hard = [(c, s) for c, s in absent if c in colours and s in shapes]
        return [f"Is there a {c} {s}?" for c, s in (hard or absent)]
    if category == "where":
        unique = [o for o in scene if sum(p.name == o.name for p in scene) == 1]
        return [f"Where is the {o.name}?" for o in unique if CELLS[o.cell] == answer]
    raise ValueError(f"`category` should be one of {', '.join(CATEGORIES)}, got {category!r}")


def answer_of(scene: Scene, category: str, question: str) -> str:
    """The answer to `question` in `scene`, found by asking every answer: a check of the data."""
    matches = [
        a for a in ANSWERS[category] if question in questions_with_answer(scene, category, a)
    ]
    if len(matches) != 1:
        raise ValueError(f"{question!r} has answers {matches} in scene {scene}")
    return matches[0]


def feasible_answers(scene: Scene, category: str) -> list[str]:
    """The answers of `category` that some question about `scene` has."""
    return [a for a in ANSWERS[category] if questions_with_answer(scene, category, a)]


def random_question(scene: Scene, category: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) for a training round: the answer first, among those the scene allows."""
    answer = rng.choice(feasible_answers(scene, category))
    return rng.choice(questions_with_answer(scene, category, answer)), answer


# -- the files -------------------------------------------------------------------------------------


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"`{name}` should be an integer >= {minimum} but the value passed is {value!r}."
        )


def distinct_scenes(rng: random.Random, count: int) -> list[Scene]:
    """`count` different scenes, the first draws of `rng`: the training scenes of a seed."""
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    while len(scenes) < count:  # distinct: no scene counted twice
        scene = random_scene(rng)
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    return scenes


def _train_record(index: int, scene: Scene, rng: random.Random, max_turns: int) -> dict:
    # `where` needs an object that is unique in its scene (two red circles have no one place).
    categories = [c for c in CATEGORIES if feasible_answers(scene, c)]
    turns = []
    for category in rng.sample(categories, rng.randint(1, min(max_turns, len(categories)))):
        question, reply = random_question(scene, category, rng)
        prefix = f"{IMAGE_TOKEN}\n" if not turns else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": reply}]
    return {"id": f"{index:06d}", "image": f"{index:06d}.png", "conversations": turns}


def _eval_item(index: int, rng: random.Random, used: set[Scene]) -> tuple[Scene, EvalItem]:
    """Item `index`: category and answer cycle (balanced), then a new scene that has that answer.

    Picking the answer before the scene is what makes the answers of a category equally frequent,
    so no text-only guess beats chance.
    """
    category = CATEGORIES[index % len(CATEGORIES)]
    options = ANSWERS[category]
    answer = options[(index // len(CATEGORIES)) % len(options)]
    while True:
        scene = random_scene(rng)
        questions = questions_with_answer(scene, category, answer)
        if questions and scene not in used:
            break
    used.add(scene)
    item = EvalItem(
        index=index,
        image=f"eval_images/{index:06d}.png",
        question=rng.choice(questions),
        answer=answer,
        answer_letter=OPTION_LETTERS[options.index(answer)],
        options=options,
        category=category,
        l2_category=L2_CATEGORY[category],
        scene=scene,
    )
    return scene, item


def write_task(
    out_dir: str | Path,
    *,
    train_images: int = 400,
    eval_items: int = 250,
    seed: int = 0,
    image_size: int = 112,
    max_turns: int = 3,
) -> dict[str, Path]:
    """Write the training JSON + images and the held-out items (JSON, TSV) under `out_dir`.

    Evaluation items cycle through the categories (equal numbers per category), each on its own
    scene, drawn from a separate random stream and never one of the training scenes.
    """
    _check_count("train_images", train_images, 1)
    _check_count("eval_items", eval_items, len(CATEGORIES))
    _check_count("max_turns", max_turns, 1)
    out_dir = Path(out_dir)
    paths = {
        "data": out_dir / TRAIN_JSON,
        "images": out_dir / "images",
        "eval": out_dir / EVAL_JSON,
        "eval_images": out_dir / "eval_images",
        "eval_tsv": out_dir / EVAL_TSV,
    }
    paths["images"].mkdir(parents=True, exist_ok=True)
    paths["eval_images"].mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    train_scenes = distinct_scenes(rng, train_images)
    seen = set(train_scenes)
    records = []
    for index, scene in enumerate(train_scenes):
        draw(scene, rng, image_size).save(paths["images"] / f"{index:06d}.png")
        records.append(_train_record(index, scene, rng, max_turns))
    paths["data"].write_text(json.dumps(records, indent=1) + "\n")

    eval_rng = random.Random(f"{seed}-eval")  # its own stream: more training data, same eval set
    items = []
    for index in range(eval_items):
        scene, item = _eval_item(index, eval_rng, used=seen)  # `seen` grows: disjoint from train
        draw(scene, eval_rng, image_size).save(out_dir / item.image)
        items.append(item)
    paths["eval"].write_text(json.dumps([asdict(item) for item in items], indent=1) + "\n")
    write_mcq_tsv(items, out_dir, paths["eval_tsv"])
    return paths


def corpus() -> list[str]:
    """Every question and answer text of the task: what its tokenizer is trained on."""
    texts = []
    objects = [Obj(cell, s, c) for cell in range(len(CELLS)) for s in SHAPES for c in COLOURS]
    for category in CATEGORIES:
        for answer in ANSWERS[category]:
            texts.append(answer)
            for obj in objects:
                # Scenes with one object, plus a second that makes `count` answers above one.
                for scene in ((obj,), (obj, Obj((obj.cell + 1) % 4, obj.shape, obj.colour))):
                    texts += questions_with_answer(tuple(sorted(scene)), category, answer)
    return sorted(set(texts))
