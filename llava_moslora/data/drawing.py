"""The picture both offline tasks draw: shapes in the cells of a 2 x 2 grid on a light canvas.

The shapes task (synthetic.py) puts one shape in one colour in one to four cells; the
compositional task (compositional.py) gives each object its own shape and colour. Both are lists
of `Obj`s to `draw`, with the same palette, grid and jitter.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True, order=True)
class Obj:
    """One object: a `shape` in a `colour`, in grid cell `cell` (an index into CELLS)."""

    cell: int
    shape: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def draw(objects: Iterable[Obj], rng: random.Random, size: int = 112) -> Image.Image:
    """Render `objects` on a `size` x `size` canvas, jittering each shape inside its cell."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    cell = size // 2
    for obj in objects:
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
