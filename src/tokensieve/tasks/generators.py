"""The five task generators. Each takes a seeded RNG and returns one Example."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .example import Example
from .glyphs import GLYPHS
from .scene import CELL_NAMES, COLOURS, GRID, SHAPES, Item, render

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COUNT_WORDS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
MAX_COUNT = len(COUNT_WORDS) - 1


def _cells(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` distinct cells in random order."""
    return [int(c) for c in rng.permutation(GRID * GRID)[:n]]


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator, cell: int, avoid: set[tuple[str, str]] = frozenset()) -> Item:
    """A coloured shape at ``cell`` whose (colour, shape) is not in ``avoid``."""
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in avoid]
    colour, shape = combos[int(rng.integers(len(combos)))]
    return Item(cell=cell, colour=colour, shape=shape)


def _yes_no(rng: np.random.Generator) -> bool:
    return bool(rng.integers(2))


def attribute(rng: np.random.Generator) -> Example:
    """Colour or shape of the object in a named cell; 1-3 distractor objects elsewhere."""
    cells = _cells(rng, int(rng.integers(2, 5)))
    items = [_random_object(rng, c) for c in cells]
    image, boxes = render(items, rng)
    target = items[0]
    if _yes_no(rng):
        question, answer = f"what colour is the object at {CELL_NAMES[target.cell]} ?", target.colour
    else:
        question, answer = f"what shape is the object at {CELL_NAMES[target.cell]} ?", target.shape
    return Example("attribute", image, question, str(answer), [boxes[0]], tuple(items))


def existence(rng: np.random.Generator) -> Example:
    """Is there a <colour> <shape>? Balanced; "no" images contain near misses (same colour or same shape)."""
    colour, shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    present = _yes_no(rng)
    cells = _cells(rng, int(rng.integers(2, 5)))
    others = [_random_object(rng, c, avoid={(colour, shape)}) for c in cells[1:]]
    if present:
        first = Item(cells[0], colour, shape)
    else:
        near = [(colour, s) for s in SHAPES if s != shape] + [(c, shape) for c in COLOUR_NAMES if c != colour]
        c, s = near[int(rng.integers(len(near)))]
        first = Item(cells[0], c, s)
    items = [first, *others]
    image, boxes = render(items, rng)
    question = f"is there a {colour} {shape} ?"
    answer, relevant = ("yes", [boxes[0]]) if present else ("no", boxes)
    return Example("existence", image, question, answer, relevant, tuple(items))


def counting(rng: np.random.Generator) -> Example:
    """How many <shape>s (0-5, uniform)? 1-3 distractors of other shapes, any colours."""
    shape = _pick(rng, SHAPES)
    count = int(rng.integers(MAX_COUNT + 1))
    n_distract = int(rng.integers(1, min(3, GRID * GRID - count) + 1))
    cells = _cells(rng, count + n_distract)
    targets = [Item(c, _pick(rng, COLOUR_NAMES), shape) for c in cells[:count]]
    other_shapes = [s for s in SHAPES if s != shape]
    distract = [Item(c, _pick(rng, COLOUR_NAMES), _pick(rng, other_shapes)) for c in cells[count:]]
    items = targets + distract
    image, boxes = render(items, rng)
    question = f"how many {shape}s are there ?"
    return Example("counting", image, question, COUNT_WORDS[count], boxes[:count], tuple(items))


def relation(rng: np.random.Generator) -> Example:
    """Is the <A> left of / above the <B>? A and B unique in the image, in different columns / rows; balanced."""
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    ia, ib = rng.choice(len(combos), size=2, replace=False)
    (ca, sa), (cb, sb) = combos[int(ia)], combos[int(ib)]
    horizontal = _yes_no(rng)
    answer = _yes_no(rng)
    while True:
        cell_a, cell_b = _cells(rng, 2)
        (ra, ka), (rb, kb) = divmod(cell_a, GRID), divmod(cell_b, GRID)
        first, second = (ka, kb) if horizontal else (ra, rb)
        if first != second and (first < second) == answer:
            break
    free = [c for c in _cells(rng, GRID * GRID) if c not in (cell_a, cell_b)]
    n_distract = int(rng.integers(1, 3))
    distract = [_random_object(rng, c, avoid={(ca, sa), (cb, sb)}) for c in free[:n_distract]]
    items = [Item(cell_a, ca, sa), Item(cell_b, cb, sb), *distract]
    image, boxes = render(items, rng)
    word = "left of" if horizontal else "above"
    question = f"is the {ca} {sa} {word} the {cb} {sb} ?"
    return Example("relation", image, question, "yes" if answer else "no", boxes[:2], tuple(items))


def detail(rng: np.random.Generator) -> Example:
    """Which character is drawn at a named cell? 1-2 other glyphs and 0-2 coloured shapes as distractors."""
    n_glyphs = int(rng.integers(2, 4))
    n_shapes = int(rng.integers(0, 3))
    cells = _cells(rng, n_glyphs + n_shapes)
    chars = [GLYPHS[int(i)] for i in rng.choice(len(GLYPHS), size=n_glyphs, replace=False)]
    items = [Item(c, glyph=g) for c, g in zip(cells, chars)]
    items += [_random_object(rng, c) for c in cells[n_glyphs:]]
    image, boxes = render(items, rng)
    question = f"what is the character at {CELL_NAMES[cells[0]]} ?"
    return Example("detail", image, question, chars[0], [boxes[0]], tuple(items))


GENERATORS: dict[str, Callable[[np.random.Generator], Example]] = {
    "attribute": attribute,
    "existence": existence,
    "counting": counting,
    "relation": relation,
    "detail": detail,
}
