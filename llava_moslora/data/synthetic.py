"""A synthetic LLaVA instruction set whose answers can only be read off the image.

Each image is a light canvas cut into a 2 x 2 grid; one to four cells hold the same shape in the
same colour. Questions ask for the colour, the shape, the count or the occupied cells, so a model
that ignores the image cannot do better than guessing. The JSON has the layout of LLaVA-1.5's
`llava_v1_5_mix665k.json`, which is what XTuner's `LLaVADataset` + `llava_map_fn` read:

    [{"id": "000000", "image": "000000.png",
      "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"},
                        {"from": "gpt", "value": "There are two circles."}, ...]}, ...]

Everything is drawn with PIL from a seeded `random.Random`: the same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 38, 38),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "yellow": (234, 179, 8),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major 2 x 2 grid
COUNT_WORDS = ("one", "two", "three", "four")
BACKGROUND = (245, 245, 240)
IMAGE_TOKEN = "<image>"  # xtuner.utils.DEFAULT_IMAGE_TOKEN

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


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, len(CELLS))
    cells = tuple(sorted(rng.sample(range(len(CELLS)), count)))
    return Scene(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), cells=cells)


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
        names = [CELLS[i] for i in scene.cells]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"The {scene.noun} {scene.verb} in the {listed}."
    raise ValueError(f"`kind` should be one of {sorted(QUESTIONS)}, got {kind!r}")


def draw(scene: Scene, rng: random.Random, size: int = 112) -> Image.Image:
    """Render `scene` on a `size` x `size` canvas, jittering each shape inside its cell."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    cell = size // 2
    fill = COLOURS[scene.colour]
    for index in scene.cells:
        row, col = divmod(index, 2)
        radius = rng.uniform(0.28, 0.38) * cell
        cx = col * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
        cy = row * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if scene.shape == "circle":
            canvas.ellipse(box, fill=fill)
        elif scene.shape == "square":
            canvas.rectangle(box, fill=fill)
        else:  # triangle
            canvas.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                fill=fill,
            )
    return image


def conversation(scene: Scene, rng: random.Random, max_turns: int = 2) -> list[dict[str, str]]:
    """One to `max_turns` question/answer rounds; the image token opens the first question."""
    kinds = rng.sample(sorted(QUESTIONS), rng.randint(1, max_turns))
    turns = []
    for i, kind in enumerate(kinds):
        question = rng.choice(QUESTIONS[kind])
        if i == 0:
            question = f"{IMAGE_TOKEN}\n{question}"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": answer(scene, kind)})
    return turns


def corpus() -> Iterator[str]:
    """Every question and every possible answer: the text a tokenizer for this data must cover."""
    for questions in QUESTIONS.values():
        yield from questions
    for shape in SHAPES:
        for colour in COLOURS:
            for mask in range(1, 2 ** len(CELLS)):
                cells = tuple(i for i in range(len(CELLS)) if mask >> i & 1)
                scene = Scene(shape=shape, colour=colour, cells=cells)
                for kind in QUESTIONS:
                    yield answer(scene, kind)


def write_dataset(
    out_dir: str | Path, *, samples: int = 320, seed: int = 0, image_size: int = 112
) -> Path:
    """Write `out_dir/tiny_llava.json` and `out_dir/images/*.png`; return the JSON's path."""
    if samples < 1:
        raise ValueError(f"`samples` should be a positive integer, got {samples}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for index in range(samples):
        scene = random_scene(rng)
        name = f"{index:06d}.png"
        draw(scene, rng, image_size).save(image_dir / name)
        records.append(
            {"id": f"{index:06d}", "image": name, "conversations": conversation(scene, rng)}
        )
    json_path = out_dir / "tiny_llava.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    return json_path
