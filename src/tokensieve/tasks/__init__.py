"""Procedurally generated image-question tasks with fixed, disjoint train and test splits.

Example ``i`` of split ``s`` of task ``t`` is drawn from an RNG seeded by
(task index, split base + i), so it is always the same bytes. Split bases are
far apart, so no test seed is ever used in training.
"""

from __future__ import annotations

import numpy as np

from .example import Example
from .generators import COLOUR_NAMES, COUNT_WORDS, GENERATORS
from .glyphs import GLYPHS
from .scene import CELL_NAMES, IMAGE_SIZE, SHAPES

TASKS: tuple[str, ...] = tuple(GENERATORS)
SPLITS: dict[str, int] = {"train": 0, "test": 1 << 40}
"""Seed base of each split; a split holds at most 2**40 examples."""
SPLIT_SIZE = 1 << 40


def example_seed(task: str, split: str, i: int) -> tuple[int, int]:
    """The RNG seed of example ``i`` of ``split`` of ``task``: (task index, split base + i)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not 0 <= i < SPLIT_SIZE:
        raise ValueError(f"example index {i} out of range [0, 2**40)")
    return TASKS.index(task), SPLITS[split] + i


def generate(task: str, split: str, n: int, start: int = 0) -> list[Example]:
    """Examples ``start`` .. ``start + n - 1`` of ``split`` ("train" or "test") of ``task``."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    example_seed(task, split, start)  # validates names and range
    gen = GENERATORS[task]
    return [gen(np.random.default_rng(list(example_seed(task, split, i)))) for i in range(start, start + n)]


def vocabulary() -> list[str]:
    """Every word that can occur in any task's questions or answers, sorted."""
    words: set[str] = {"what", "colour", "shape", "is", "the", "object", "at", "?", "there", "a", "how", "many",
                       "are", "left", "of", "above", "character", "yes", "no"}
    words.update(COLOUR_NAMES, SHAPES, (s + "s" for s in SHAPES), COUNT_WORDS, GLYPHS)
    for name in CELL_NAMES:
        words.update(name.split())
    return sorted(words)


__all__ = ["TASKS", "SPLITS", "Example", "IMAGE_SIZE", "generate", "example_seed", "vocabulary"]
