"""Every question of every task type that can be asked, with its answer, about a scene's items.

Used to train on several questions per image (one forward pass of the image,
several supervised answers); the task generators pick one such question each.
"""

from __future__ import annotations

import numpy as np

from .generators import COLOUR_NAMES, COUNT_WORDS
from .scene import CELL_NAMES, GRID, SHAPES, Item


def scene_questions(items: tuple[Item, ...], rng: np.random.Generator, n: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Up to ``n`` distinct (question, answer, evidence cells) about ``items``, mixed over all task types,
    in random order. The evidence cells hold the objects the answer depends on (for "no" to
    "is there a <c> <s>": the near misses sharing its colour or shape; for a count of 0: none)."""
    objects = [it for it in items if it.shape is not None]
    combos = [(it.colour, it.shape) for it in objects]
    pool: list[tuple[str, str, tuple[int, ...]]] = []
    for it in objects:
        pool.append((f"what colour is the object at {CELL_NAMES[it.cell]} ?", str(it.colour), (it.cell,)))
        pool.append((f"what shape is the object at {CELL_NAMES[it.cell]} ?", str(it.shape), (it.cell,)))
    for it in items:
        if it.glyph is not None:
            pool.append((f"what is the character at {CELL_NAMES[it.cell]} ?", it.glyph, (it.cell,)))
    present = set(combos)
    absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
    for c, s in present:
        pool.append((f"is there a {c} {s} ?", "yes", tuple(it.cell for it in objects if (it.colour, it.shape) == (c, s))))
    for i in rng.permutation(len(absent))[: max(1, len(present))]:
        c, s = absent[int(i)]
        near = tuple(it.cell for it in objects if it.colour == c or it.shape == s)
        pool.append((f"is there a {c} {s} ?", "no", near))
    for shape in SHAPES:
        cells = tuple(it.cell for it in objects if it.shape == shape)
        if len(cells) < len(COUNT_WORDS):
            pool.append((f"how many {shape}s are there ?", COUNT_WORDS[len(cells)], cells))
    unique = [it for it in objects if combos.count((it.colour, it.shape)) == 1]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            (ra, ka), (rb, kb) = divmod(a.cell, GRID), divmod(b.cell, GRID)
            for word, first, second in (("left of", ka, kb), ("above", ra, rb)):
                if first != second:
                    question = f"is the {a.colour} {a.shape} {word} the {b.colour} {b.shape} ?"
                    pool.append((question, "yes" if first < second else "no", (a.cell, b.cell)))
    return [pool[int(i)] for i in rng.permutation(len(pool))[:n]]
