"""Scene vocabulary and rendering: a 3x3 grid of cells on a plain background.

An image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB. Each object occupies one cell
(so objects never touch). Inside its cell it is centred in a ``SLOT``-pixel block
whose corner sits at a random multiple of ``STEP`` pixels, so an object always
covers the same 2x2 vision patches of 8 px (a few tokens carry the answer, the
rest are plain background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .glyphs import glyph_mask

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID
OBJECT_SIZE = 14
SLOT = 16
STEP = 8
GLYPH_SCALE = 2

BACKGROUND: tuple[int, int, int] = (123, 117, 104)
"""The CLIP mean colour: background pixels normalise to ~0, so the few object patches stand out."""
INK: tuple[int, int, int] = (20, 20, 20)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 220),
    "yellow": (235, 195, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COL_NAMES: tuple[str, ...] = ("left", "center", "right")


def cell_name(cell: int) -> str:
    """Name of cell 0..8 (row-major): "top left", "top", ..., "center", ..., "bottom right"."""
    row, col = divmod(cell, GRID)
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COL_NAMES[col]
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


CELL_NAMES: tuple[str, ...] = tuple(cell_name(c) for c in range(GRID * GRID))


@dataclass(frozen=True)
class Item:
    """One drawn thing: a coloured shape, or a glyph (``glyph`` set, ``shape`` None) in ink, or in
    ``colour`` when one is given."""

    cell: int
    colour: str | None = None
    shape: str | None = None
    glyph: str | None = None


def shape_mask(shape: str, size: int = OBJECT_SIZE) -> np.ndarray:
    """Bool mask of shape (size, size) for one of ``SHAPES``."""
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        c = (size - 1) / 2
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        half_width = (yy + 1) / size * (size / 2)
        return np.abs(xx - (size - 1) / 2) <= half_width
    raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def item_mask(item: Item) -> np.ndarray:
    """Bool mask of an item: (OBJECT_SIZE, OBJECT_SIZE) for shapes, (14, 10) for glyphs."""
    if item.glyph is not None:
        return glyph_mask(item.glyph, GLYPH_SCALE)
    assert item.shape is not None
    return shape_mask(item.shape)


def render(items: list[Item], rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Draw ``items`` (distinct cells) and return the image and each item's box (x0, y0, x1, y1), x1/y1 exclusive."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    boxes = []
    for item in items:
        mask = item_mask(item)
        h, w = mask.shape
        row, col = divmod(item.cell, GRID)
        slots = (CELL - SLOT) // STEP + 1
        y0 = row * CELL + STEP * int(rng.integers(slots)) + (SLOT - h) // 2
        x0 = col * CELL + STEP * int(rng.integers(slots)) + (SLOT - w) // 2
        colour = INK if item.colour is None else COLOURS[item.colour]
        canvas[y0 : y0 + h, x0 : x0 + w][mask] = colour
        boxes.append((x0, y0, x0 + w, y0 + h))
    return Image.fromarray(canvas, "RGB"), boxes
