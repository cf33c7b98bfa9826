"""A synthetic LLaVA instruction set whose answers can only be read off the image.

Each image is a light canvas cut into a 2 x 2 grid; one to four cells hold the same shape in the
same colour. Questions ask for the colour, the shape, the count or the occupied cells, so a model
that ignores the image cannot do better than guessing. As in LLaVA-1.5's 665K mix, free-form
rounds ("The circles are blue.") are mixed with rounds in the answer formats of the benchmarks
(tiny_bench.py): multiple choice in English or Chinese answered by the option's letter, yes/no,
and single-word answers; which of them each conversation gets is `benchmark_rounds`. The JSON has the layout of LLaVA-1.5's `llava_v1_5_mix665k.json`, which
is what XTuner's `LLaVADataset` + `llava_map_fn` read:

    [{"id": "000000", "image": "000000.png",
      "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"},
                        {"from": "gpt", "value": "There are two circles."},
                        {"from": "human", "value": "Is there a square in the image? Please
                                                    answer yes or no.\\nAnswer the question
                                                    using a single word or phrase."},
                        {"from": "gpt", "value": "No"}, ...]}, ...]

Everything is drawn with PIL from a seeded `random.Random`: the same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from .drawing import CELLS, COLOURS, COUNT_WORDS, SHAPES, Obj, draw
from .items import OPTION_LETTERS, EvalItem, write_mcq_tsv
from .prompts import IMAGE_TOKEN, YES_NO_SUFFIX, mcq_prompt, short_answer_prompt

QUESTIONS = {
    "colour": ("What colour are the shapes?", "Which colour do you see?"),
    "shape": ("What shape is drawn?", "Which shape do you see?"),
    "count": ("How many shapes are there?", "Count the shapes."),
    "where": ("Where are the shapes?", "Which cells are filled?"),
}


@dataclass(frozen=True)
class Scene:
    """What one image shows: `len(cells)` copies of `shape` in `colour`, one per grid cell."""

    shape: str
    colour: str
    cells: tuple[int, ...]  # indices into CELLS, ascending

    @property
    def count(self) -> int:
        return len(self.cells)

    @property
    def noun(self) -> str:
        return self.shape if self.count == 1 else f"{self.shape}s"

    @property
    def verb(self) -> str:
        return "is" if self.count == 1 else "are"

    @property
    def objects(self) -> tuple[Obj, ...]:
        """What `drawing.draw` renders: the shape in the colour, in each of the cells."""
        return tuple(Obj(cell, self.shape, self.colour) for cell in self.cells)


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, len(CELLS))
    cells = tuple(sorted(rng.sample(range(len(CELLS)), count)))
    return Scene(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), cells=cells)


def filled_cells(scene: Scene) -> str:
    """The scene's cells in words: "top left", "top left and bottom right", "a, b and c"."""
    names = [CELLS[i] for i in scene.cells]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def answer(scene: Scene, kind: str) -> str:
    """The reference answer to a question of `kind` about `scene`."""
    if kind == "colour":
        return f"The {scene.noun} {scene.verb} {scene.colour}."
    if kind == "shape":
        article = "a" if scene.count == 1 else COUNT_WORDS[scene.count - 1]
        return f"I see {article} {scene.colour} {scene.noun}."
    if kind == "count":
        return f"There {scene.verb} {COUNT_WORDS[scene.count - 1]} {scene.noun}."
    if kind == "where":
        return f"The {scene.noun} {scene.verb} in the {filled_cells(scene)}."
    raise ValueError(f"`kind` should be one of {sorted(QUESTIONS)}, got {kind!r}")


# ----------------------------------------------------------------------------- benchmark formats
# LLaVA-1.5's 665K mix teaches the answer formats its benchmarks ask for (prompts.py): the
# benchmark-format rounds are laid out by the functions the eval model builds its prompts with,
# so that the formats, not only the scenes, are seen in training. The benchmark's images are
# separate draws (tiny_bench.py's own random stream).
LANGUAGES = ("en", "cn")
WARM_COLOURS = ("red", "yellow")

# Multiple-choice kinds (MMBench's six abilities, one kind each): the question in each language
# and the option texts, keyed by the value `mcq_truth` returns. The English colour, shape and count
# questions are the free-form ones of QUESTIONS.
MCQ_QUESTIONS = {
    "colour": {"en": QUESTIONS["colour"][0], "cn": "图中形状是什么颜色？"},
    "shape": {"en": QUESTIONS["shape"][0], "cn": "图中画的是什么形状？"},
    "count": {"en": QUESTIONS["count"][0], "cn": "图中有几个形状？"},
    "warmth": {"en": "Is the colour of the shapes warm or cool?", "cn": "形状的颜色是暖色还是冷色？"},
    "rows": {"en": "Which row of the grid holds more shapes?", "cn": "网格的哪一行形状更多？"},
    "parity": {"en": "Is the number of shapes even or odd?", "cn": "形状的数量是偶数还是奇数？"},
}  # fmt: skip
OPTION_TEXTS = {
    "en": {
        "colour": {c: c for c in COLOURS},
        "shape": {s: s for s in SHAPES},
        "count": dict(zip(range(1, 5), COUNT_WORDS, strict=True)),
        "warmth": {"warm": "warm", "cool": "cool"},
        "rows": {"top": "the top row", "bottom": "the bottom row", "same": "both rows equally"},
        "parity": {"even": "even", "odd": "odd"},
    },
    "cn": {
        "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"},
        "shape": {"circle": "圆形", "square": "正方形", "triangle": "三角形"},
        "count": {1: "一个", 2: "两个", 3: "三个", 4: "四个"},
        "warmth": {"warm": "暖色", "cool": "冷色"},
        "rows": {"top": "上面一行", "bottom": "下面一行", "same": "两行一样多"},
        "parity": {"even": "偶数", "odd": "奇数"},
    },
}
# Yes/no kinds (MME's perception category names): the question, filled with a true or false value.
YES_NO_QUESTIONS = {
    "color": "Are the shapes {} in the image?" + YES_NO_SUFFIX,
    "count": "Are there exactly {} shapes in the image?" + YES_NO_SUFFIX,
    "existence": "Is there a {} in the image?" + YES_NO_SUFFIX,
    "position": "Is there a shape in the {} cell of the grid?" + YES_NO_SUFFIX,
}
YES_NO_ANSWERS = ("Yes", "No")  # a true question's answer, a false one's
# Short-answer kinds (TextVQA-style): answered with the colour, the shape or the count word.
SHORT_ANSWER_KINDS = ("colour", "shape", "count")
# "mcq_text" is a multiple-choice round answered by the option's text instead of its letter, which
# VLMEvalKit's exact matching maps back to the letter (`can_infer_text`: the one option whose text
# the answer contains). The quickstart trains it: the tiny LLM does not learn, within its budget,
# to look the letter up next to the matching option (docs/evaluation.md has the measurements).
# "yes_no_read" is a yes/no round answered with what the picture shows, then the verdict
# ("Are the shapes red ...?" -> "blue No"; "Is there a shape in the top left cell ...?" ->
# "top right and bottom left No"); VLMEvalKit's MME scoring reads the yes or the no word
# (`YOrN_Extraction`). The verdict is then a comparison of the question's value with words of the
# text, which a language model brings from pretraining (make-tiny --verdict-steps gives the tiny
# LLM that skill), while the words before it are the reading of the image, which the adapters learn.
BENCHMARK_FORMATS = ("mcq", "mcq_text", "yes_no", "yes_no_read", "short")
# The benchmark-format rounds of each conversation (make-tiny's default; `--benchmark-rounds`
# picks others). Two multiple-choice and two yes/no rounds, as answering them means matching the
# image against the question's text (which option, which value), the slowest skill for the tiny
# model to learn; a round is cheap next to the image. The ablation (configs/tiny_ablation.py)
# instead uses ("short", "short"): with this mix its rank-8 LoRA stayed at chance on the held-out
# short-answer items.
BENCHMARK_ROUNDS = ("mcq", "mcq", "yes_no", "yes_no", "short")


def mcq_truth(scene: Scene, kind: str) -> str | int:
    """The right option of a multiple-choice question of `kind`, as a key of OPTION_TEXTS."""
    if kind == "colour":
        return scene.colour
    if kind == "shape":
        return scene.shape
    if kind == "count":
        return scene.count
    if kind == "warmth":
        return "warm" if scene.colour in WARM_COLOURS else "cool"
    if kind == "rows":
        top = sum(1 for c in scene.cells if c < 2)  # cells 0 and 1 are the top row
        bottom = scene.count - top
        return "top" if top > bottom else "bottom" if bottom > top else "same"
    if kind == "parity":
        return "even" if scene.count % 2 == 0 else "odd"
    raise ValueError(f"`kind` should be one of {list(MCQ_QUESTIONS)}, got {kind!r}")


def mcq_options(scene: Scene, kind: str, rng: random.Random) -> list[str | int]:
    """The right option and up to three wrong ones (MMBench's four at most), in a random order."""
    truth = mcq_truth(scene, kind)
    distractors = [c for c in OPTION_TEXTS["en"][kind] if c != truth]
    rng.shuffle(distractors)
    options = [truth, *distractors[: len(OPTION_LETTERS) - 1]]
    rng.shuffle(options)
    return options


def lettered(option_texts: list[str]) -> dict[str, str]:
    """{letter: text} of at most four options, A first: what `prompts.mcq_prompt` lays out."""
    if len(option_texts) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {option_texts!r}")
    return dict(zip(OPTION_LETTERS, option_texts, strict=False))


def short_answer(scene: Scene, kind: str) -> str:
    """The one-word answer to the short-answer question of `kind` ("red", "circle", "two")."""
    if kind not in SHORT_ANSWER_KINDS:
        raise ValueError(f"`kind` should be one of {list(SHORT_ANSWER_KINDS)}, got {kind!r}")
    truth = mcq_truth(scene, kind)
    return COUNT_WORDS[truth - 1] if kind == "count" else truth


def seen_value(scene: Scene, kind: str) -> str:
    """The words of the picture a yes/no question of `kind` compares with ("red", "three",
    "circle", "top left and bottom right")."""
    if kind not in YES_NO_QUESTIONS:
        raise ValueError(f"`kind` should be one of {list(YES_NO_QUESTIONS)}, got {kind!r}")
    if kind == "position":
        return filled_cells(scene)
    return short_answer(scene, {"color": "colour", "count": "count", "existence": "shape"}[kind])


def yes_no_reply(scene: Scene, kind: str, verdict: str, read: bool) -> str:
    """The answer of a yes/no round: the verdict, after the words of the picture if `read`."""
    return f"{seen_value(scene, kind)} {verdict}" if read else verdict


def yes_no_turn(scene: Scene, rng: random.Random, read: bool = False) -> tuple[str, str]:
    """A yes/no round about `scene`, its kind drawn from YES_NO_QUESTIONS (position only if a cell
    is empty) and its truth from `rng`, half "Yes": (prompt, answer)."""
    kinds = [k for k in YES_NO_QUESTIONS if k != "position" or scene.count < len(CELLS)]
    kind = rng.choice(kinds)
    pair = yes_no_pair(scene, kind, rng)
    truth = rng.randrange(2)  # half "Yes", half "No"
    reply = yes_no_reply(scene, kind, YES_NO_ANSWERS[truth], read)
    return short_answer_prompt(pair[truth]), reply


def yes_no_pair(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """A question about `scene` whose answer is Yes and one whose answer is No."""
    ask = YES_NO_QUESTIONS.get(kind)
    if ask is None:
        raise ValueError(f"`kind` should be one of {list(YES_NO_QUESTIONS)}, got {kind!r}")
    if kind == "color":
        other = rng.choice([c for c in COLOURS if c != scene.colour])
        return ask.format(scene.colour), ask.format(other)
    if kind == "count":
        other = rng.choice([n for n in range(1, 5) if n != scene.count])
        return ask.format(COUNT_WORDS[scene.count - 1]), ask.format(COUNT_WORDS[other - 1])
    if kind == "existence":
        other = rng.choice([s for s in SHAPES if s != scene.shape])
        return ask.format(scene.shape), ask.format(other)
    empty = [i for i in range(len(CELLS)) if i not in scene.cells]
    if not empty:
        raise ValueError("a position pair needs a scene with an empty cell")
    full = CELLS[rng.choice(scene.cells)]
    return ask.format(full), ask.format(CELLS[rng.choice(empty)])


def benchmark_turn(scene: Scene, fmt: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) round in benchmark format `fmt`, one of BENCHMARK_FORMATS."""
    if fmt in ("mcq", "mcq_text"):
        kind, lang = rng.choice(list(MCQ_QUESTIONS)), rng.choice(LANGUAGES)
        options = mcq_options(scene, kind, rng)
        texts = [OPTION_TEXTS[lang][kind][o] for o in options]
        prompt = mcq_prompt(MCQ_QUESTIONS[kind][lang], lettered(texts), lang)
        right = options.index(mcq_truth(scene, kind))
        return prompt, OPTION_LETTERS[right] if fmt == "mcq" else texts[right]
    if fmt in ("yes_no", "yes_no_read"):
        return yes_no_turn(scene, rng, read=fmt == "yes_no_read")
    if fmt == "short":
        kind = rng.choice(SHORT_ANSWER_KINDS)
        question = rng.choice(QUESTIONS[kind])
        return short_answer_prompt(question), short_answer(scene, kind)
    raise ValueError(f"`fmt` should be one of {list(BENCHMARK_FORMATS)}, got {fmt!r}")


def conversation(
    scene: Scene,
    rng: random.Random,
    max_turns: int = 2,
    benchmark_rounds: tuple[str, ...] = BENCHMARK_ROUNDS,
) -> list[dict[str, str]]:
    """One to `max_turns` free-form rounds plus one round per `benchmark_rounds` format, shuffled.

    The image token opens the first question, whichever format it has: at evaluation every
    benchmark question comes first, right after the image.
    """
    kinds = rng.sample(sorted(QUESTIONS), rng.randint(1, max_turns))
    rounds = [(rng.choice(QUESTIONS[kind]), answer(scene, kind)) for kind in kinds]
    rounds += [benchmark_turn(scene, fmt, rng) for fmt in benchmark_rounds]
    rng.shuffle(rounds)
    return as_turns(rounds)


def as_turns(rounds: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) rounds as LLaVA JSON turns, the image token opening the first question."""
    turns = []
    for i, (question, reply) in enumerate(rounds):
        turns.append(
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question}
        )
        turns.append({"from": "gpt", "value": reply})
    return turns


def prompts() -> Iterator[str]:
    """Every question text the data asks, benchmark formats laid out in full (options rotated)."""
    for questions in QUESTIONS.values():
        yield from questions
    for lang in LANGUAGES:
        for kind, question in MCQ_QUESTIONS.items():
            texts = list(OPTION_TEXTS[lang][kind].values())[: len(OPTION_LETTERS)]
            for k in range(len(texts)):  # each option at each letter
                yield mcq_prompt(question[lang], lettered(texts[k:] + texts[:k]), lang)
    for kind, ask in YES_NO_QUESTIONS.items():
        values = {
            "color": list(COLOURS),
            "count": COUNT_WORDS,
            "existence": SHAPES,
            "position": CELLS,
        }[kind]
        for value in values:
            yield short_answer_prompt(ask.format(value))
    for kind in SHORT_ANSWER_KINDS:
        for question in QUESTIONS[kind]:
            yield short_answer_prompt(question)


def corpus() -> Iterator[str]:
    """Every question and every possible answer: the text a tokenizer for this data must cover."""
    yield from prompts()
    yield from (*OPTION_LETTERS, *YES_NO_ANSWERS)
    yield from (*COLOURS, *SHAPES, *COUNT_WORDS)
    for shape in SHAPES:
        for colour in COLOURS:
            for mask in range(1, 2 ** len(CELLS)):
                cells = tuple(i for i in range(len(CELLS)) if mask >> i & 1)
                scene = Scene(shape=shape, colour=colour, cells=cells)
                for kind in QUESTIONS:
                    yield answer(scene, kind)


HELDOUT_JSON = "heldout_eval.json"
HELDOUT_TSV = "heldout_eval.tsv"  # a name VLMEvalKit does not know: read as a custom MCQ set


def write_heldout(
    out_dir: str | Path, *, items: int = 144, seed: int = 0, image_size: int = 112
) -> Path:
    """Held-out short-answer items (colour, shape, count) on new images, `out_dir/HELDOUT_JSON`,
    and the same items as a VLMEvalKit multiple-choice set, `out_dir/HELDOUT_TSV`.

    The items are `items.EvalItem`s, so `llava_moslora.eval.heldout.evaluate_run` scores them
    the same way (each option by its log-likelihood): the kind and its answer cycle first, then a
    scene with that answer is drawn from the seed's own held-out stream, so every answer of a kind
    is equally frequent and a model that ignores the image scores chance (1/4, 1/3, 1/4). The
    images are new draws (position and size jitter), not new scenes: this task has only
    4 x 3 x 15 = 180 scenes, so the items test reading the image on unseen pictures, not
    generalising to unseen scenes (that is what the compositional task's disjoint held-out scenes
    are for).
    """
    if not isinstance(items, int) or isinstance(items, bool) or items < len(SHORT_ANSWER_KINDS):
        raise ValueError(
            f"`items` should be an integer >= {len(SHORT_ANSWER_KINDS)} (one per kind) but the "
            f"value passed is {items!r}."
        )
    options_of = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNT_WORDS}
    out_dir = Path(out_dir)
    (out_dir / "heldout_images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-heldout")  # not the training stream: more data, same items
    rows = []
    for index in range(items):
        kind = SHORT_ANSWER_KINDS[index % len(SHORT_ANSWER_KINDS)]
        options = options_of[kind]
        truth = options[(index // len(SHORT_ANSWER_KINDS)) % len(options)]
        image = f"heldout_images/{index:06d}.png"
        scene = draw_matching(
            rng, partial(short_answer, kind=kind), truth, out_dir / image, image_size
        )
        item = EvalItem(
            index=index,
            image=image,
            question=short_answer_prompt(QUESTIONS[kind][index % len(QUESTIONS[kind])]),
            answer=truth,
            answer_letter=OPTION_LETTERS[options.index(truth)],
            options=options,
            category=kind,
            l2_category="attribute" if kind != "count" else "counting",
            scene=scene.objects,
        )
        rows.append(asdict(item))
    path = out_dir / HELDOUT_JSON
    path.write_text(json.dumps(rows, indent=1) + "\n")
    # The same items for VLMEvalKit, as a multiple-choice set: the bare question (its MCQ prompt
    # adds the options and the answer-with-a-letter instruction, not a single-word one).
    bare = [
        replace(EvalItem.from_dict(row), question=row["question"].split("\n")[0]) for row in rows
    ]
    write_mcq_tsv(bare, out_dir, out_dir / HELDOUT_TSV)
    return path


def draw_matching(
    rng: random.Random,
    answer_of: Callable[[Scene], str],
    truth: str,
    path: Path,
    image_size: int = 112,
) -> Scene:
    """Draw random scenes until `answer_of` one is `truth`, save its picture at `path`, return
    it: a held-out item's answer is fixed first (answers balanced), its picture follows."""
    scene = random_scene(rng)
    while answer_of(scene) != truth:
        scene = random_scene(rng)
    draw(scene.objects, rng, image_size).save(path)
    return scene


def check_benchmark_rounds(benchmark_rounds: tuple[str, ...]) -> None:
    """Raise ValueError unless `benchmark_rounds` is a tuple of BENCHMARK_FORMATS (may be empty)."""
    if not isinstance(benchmark_rounds, tuple) or any(
        fmt not in BENCHMARK_FORMATS for fmt in benchmark_rounds
    ):
        raise ValueError(
            f"`benchmark_rounds` (make-tiny --benchmark-rounds) should be formats from "
            f"{', '.join(BENCHMARK_FORMATS)} but the value passed is {benchmark_rounds!r}; "
            f"e.g. ('short',), or --benchmark-rounds short,yes_no."
        )


def write_dataset(
    out_dir: str | Path,
    *,
    samples: int = 320,
    seed: int = 0,
    image_size: int = 112,
    benchmark_rounds: tuple[str, ...] = BENCHMARK_ROUNDS,
) -> Path:
    """Write `out_dir/tiny_llava.json` and `out_dir/images/*.png`; return the JSON's path.

    `benchmark_rounds` are the benchmark-format rounds each conversation gets besides its
    free-form ones (formats of BENCHMARK_FORMATS, repeats allowed, empty for none).
    """
    if samples < 1:
        raise ValueError(f"`samples` should be a positive integer, got {samples}")
    check_benchmark_rounds(benchmark_rounds)
    out_dir = Path(out_dir)
    return write_conversations(
        out_dir / "tiny_llava.json",
        out_dir / "images",
        samples,
        random.Random(seed),
        lambda scene, rng: conversation(scene, rng, benchmark_rounds=benchmark_rounds),
        image_size,
    )


def write_conversations(
    json_path: Path,
    image_dir: Path,
    samples: int,
    rng: random.Random,
    talk: Callable[[Scene, random.Random], list[dict[str, str]]],
    image_size: int = 112,
) -> Path:
    """`samples` random scenes drawn into `image_dir`, each with the turns `talk(scene, rng)`
    gives, as LLaVA JSON at `json_path` (image names relative to `image_dir`); its path."""
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(samples):
        scene = random_scene(rng)
        name = f"{index:06d}.png"
        draw(scene.objects, rng, image_size).save(image_dir / name)
        records.append({"id": f"{index:06d}", "image": name, "conversations": talk(scene, rng)})
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    return json_path
