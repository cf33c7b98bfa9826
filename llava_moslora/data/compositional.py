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

`option_accuracy` scores each option by its log-likelihood under a LLaVAModel, the cheap and exact
way to evaluate a tiny model without generation; the VLMEvalKit path reads the TSV.

Measured (CPU, `make-tiny --task compositional`, configs/tiny_compositional_moslora.py, r 8): the
untrained model scores 0.316 on 250 held-out items (chance 0.317); trained for 200 steps (400
images) or 750 steps (1000 images, 3 epochs) it scores 0.324 with a falling training loss
(~2.3 -> 0.85): it learns each category's answer prior and always gives one answer per category,
but does not read the image. The same holds for the default shapes task (after the tiny_moslora
run, "What colour are the shapes?" is answered right 5 times in 40, chance 10). The image features
do differ between images (projector outputs 60 % apart), and the evaluation feeds exactly the
training tokens and pixels (checked), so the tiny LLaVA itself does not learn to route image
tokens to the answer at this size and budget. Later probes (2,000 training images, 120 held-out
items, one CPU thread): r 8 adapters with the projector and ViT adapters at 1/20 of the LLM's rate
(2e-3 / 1e-4 and 5e-3 / 2.5e-4, 300-600 steps) stay at chance; r 64, and even training every
weight of the LLM (1,000 steps, lr 1e-3), reach only 0.35-0.38, mostly on `colour_at` and
`where`. The binding this task asks for is beyond the tiny model in a CPU budget, so the measured
ablation uses the shapes task's held-out items (configs/tiny_ablation.py); this task stays for
larger models and budgets. The slow test in tests/test_compositional.py is a strict xfail that
will say when training here beats chance.
"""

from __future__ import annotations

import base64
import csv
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .synthetic import BACKGROUND, CELLS, COLOURS, IMAGE_TOKEN, SHAPES

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
OPTION_LETTERS = "ABCD"  # VLMEvalKit's MCQ TSV columns; no category has more than four answers

TRAIN_JSON = "compositional.json"
EVAL_JSON = "compositional_eval.json"
EVAL_TSV = "compositional_eval.tsv"


@dataclass(frozen=True, order=True)
class Obj:
    """One object: a `shape` in a `colour`, in grid cell `cell` (an index into CELLS)."""

    cell: int
    shape: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


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


# -- drawing ---------------------------------------------------------------------------------------


def draw(scene: Scene, rng: random.Random, size: int = 112) -> Image.Image:
    """Render `scene` like `synthetic.draw` (same palette and grid), one shape per object."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    cell = size // 2
    for obj in scene:
        row, col = divmod(obj.cell, 2)
        radius = rng.uniform(0.28, 0.38) * cell
        cx = col * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
        cy = row * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            canvas.ellipse(box, fill=fill)
        elif obj.shape == "square":
            canvas.rectangle(box, fill=fill)
        else:  # triangle
            points = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
            canvas.polygon(points, fill=fill)
    return image


# -- the files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One held-out multiple-choice item; what the eval code turns into VLMEvalKit rows.

    `image` is relative to the folder of compositional_eval.json; `options` are the answers of
    the category in ANSWERS order; `answer` is the correct option text, `answer_letter` its letter.
    """

    index: int
    image: str
    question: str
    answer: str
    answer_letter: str
    options: tuple[str, ...]
    category: str
    l2_category: str
    scene: Scene = ()  # what the image shows: lets anyone re-derive the answer
    split: str = "test"

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EvalItem:
        scene = tuple(Obj(*obj) if isinstance(obj, list) else Obj(**obj) for obj in row["scene"])
        return cls(**{**row, "options": tuple(row["options"]), "scene": scene})


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


# -- evaluation: options scored by log-likelihood ---------------------------------------------------


def option_log_likelihoods(
    model,
    tokenizer,
    image_processor,
    image: Image.Image,
    question: str,
    options: Sequence[str],
    prompt_template: dict,
    system: str = "",
) -> list[float]:
    """Summed log-probability of each option as the answer (its end-of-turn suffix included).

    The prompt and answer go through XTuner's own llava_map_fn / template_map_fn / encode_fn, so
    the tokens are exactly those of training; the image is padded to a square and processed as
    the config's LLaVADataset does (pad_image_to_square=True).
    """
    import torch
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import encode_fn, expand2square
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    background = tuple(int(x * 255) for x in image_processor.image_mean)
    square = expand2square(image.convert("RGB"), background)
    pixels = image_processor.preprocess(square, return_tensors="pt")["pixel_values"]
    template_fn = template_map_fn_factory(prompt_template)
    device = next(model.parameters()).device
    with torch.no_grad():
        vision = model.visual_encoder(
            pixels.to(device, model.visual_encoder.dtype), output_hidden_states=True
        )
        features = model.projector(vision.hidden_states[model.visual_select_layer][:, 1:])
        scores = []
        for option in options:
            turns = [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": option},
            ]
            example = llava_map_fn({"conversations": turns})
            if system:
                example["conversation"][0]["system"] = system
            example = template_fn(example)
            encoded = encode_fn(example, tokenizer, max_length=10**6, with_image_token=True)
            data = prepare_inputs_labels_for_multimodal(
                llm=model.llm,
                input_ids=torch.tensor([encoded["input_ids"]], device=device),
                labels=torch.tensor([encoded["labels"]], device=device),
                pixel_values=features,
            )
            labels = data.pop("labels")  # (1, T) with the image tokens expanded, -100 = no loss
            logits = model.llm(**data).logits.float()  # (1, T, vocab)
            log_probs = logits[:, :-1].log_softmax(-1)
            targets = labels[:, 1:]
            mask = targets != -100
            picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            scores.append(float((picked * mask).sum()))
    return scores


def option_accuracy(
    model,
    tokenizer,
    image_processor,
    items: Sequence[EvalItem],
    image_root: str | Path,
    prompt_template: dict,
    system: str = "",
) -> dict[str, float]:
    """Accuracy per category and `overall` (mean over items): the highest-likelihood option wins."""
    was_training = model.training
    model.eval()
    correct: dict[str, list[bool]] = {}  # per category, in the order the items bring them
    try:
        for item in items:
            with Image.open(Path(image_root) / item.image) as image:
                scores = option_log_likelihoods(
                    model,
                    tokenizer,
                    image_processor,
                    image,
                    item.question,
                    item.options,
                    prompt_template,
                    system,
                )
            best = max(range(len(scores)), key=scores.__getitem__)
            correct.setdefault(item.category, []).append(item.options[best] == item.answer)
    finally:
        model.train(was_training)
    result = {c: sum(v) / len(v) for c, v in correct.items()}
    every = [ok for v in correct.values() for ok in v]
    result["overall"] = sum(every) / len(every)
    return result


def chance_accuracy(items: Sequence[EvalItem]) -> float:
    """The expected accuracy of guessing uniformly among each item's options."""
    return sum(1 / len(item.options) for item in items) / len(items)


def evaluate_run(
    config: str | Path,
    checkpoint: str | Path | None = None,
    items: str | Path | None = None,
    cfg_options: dict | None = None,
) -> dict[str, float]:
    """Held-out `option_accuracy` of the model a config builds, with a checkpoint's weights loaded.

    Without `checkpoint` this is the untrained model (adapters at init: B = 0, so the base model
    with the config's pretrained projector). `items` defaults to the config's `heldout_eval_path`,
    else compositional_eval.json next to its `data_path`. Loading fails loudly if the checkpoint does not fit the model.
    """
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from ..train.checkpoints import load_trained_state

    cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = BUILDER.build(cfg.model)
    if checkpoint is not None:
        state = load_trained_state(checkpoint)
        missing, unexpected = model.load_state_dict(state, strict=False)
        trained = [k for k in missing if "lora_" in k or k.startswith("projector.")]
        if unexpected or trained:
            raise ValueError(
                f"`checkpoint` {str(checkpoint)!r} does not fit the model of {str(config)!r}: "
                f"unexpected keys {unexpected[:3]}, missing trained keys {trained[:3]}. Pass the "
                "config (and --cfg-options, e.g. the rank) the checkpoint was trained with."
            )
    if items is None:  # the config names its held-out set, or it is the compositional task's
        items = cfg.get("heldout_eval_path") or Path(cfg.data_path).parent / EVAL_JSON
    items_path = Path(items)
    tokenizer = BUILDER.build(cfg.tokenizer)
    image_processor = BUILDER.build(cfg.image_processor)
    return option_accuracy(
        model,
        tokenizer,
        image_processor,
        read_eval_items(items_path),
        items_path.parent,
        cfg.prompt_template,
        cfg.get("SYSTEM", ""),
    )
