"""Procedurally generated tasks with fixed, disjoint train and test splits: image questions
(``TASKS``), long-context text questions (``TEXT_TASKS``, :mod:`.text`) and video questions
(``VIDEO_QA_TASKS``, :mod:`.video_questions`; their clips come from :mod:`.video`).

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
from .text import TEXT_GENERATORS, TEXT_TASKS, WARMUP_TASKS, TextExample

TASKS: tuple[str, ...] = tuple(GENERATORS)
"""The image tasks."""
ALL_TASKS: tuple[str, ...] = TASKS + TEXT_TASKS + WARMUP_TASKS
"""Every task (the text tasks' training-only warm-up lengths included); a task's index here seeds its items."""
SPLITS: dict[str, int] = {"train": 0, "test": 1 << 40}
"""Seed base of each split; a split holds at most 2**40 examples."""
SPLIT_SIZE = 1 << 40


def split_seed(split: str, i: int, what: str = "example") -> int:
    """The second seed word of item ``i`` of ``split``: split base + i (every generator's, image, text,
    video and detection alike; the first word tells the generators apart).

    Raises:
        ValueError: unknown split, or ``i`` outside ``[0, 2**40)`` (``what`` names the item in the message).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not 0 <= i < SPLIT_SIZE:
        raise ValueError(f"{what} index {i} out of range [0, 2**40)")
    return SPLITS[split] + i


def example_seed(task: str, split: str, i: int) -> tuple[int, int]:
    """The RNG seed of example ``i`` of ``split`` of ``task``: (task index, split base + i)."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(ALL_TASKS)}")
    return ALL_TASKS.index(task), split_seed(split, i)


VIDEO_QA_TASKS: tuple[str, ...] = ("video-direction", "video-colour", "video-count", "video-end", "video-order")
"""The video question tasks (:mod:`.video_questions`, which holds their generators)."""


def generate(task: str, split: str, n: int, start: int = 0) -> list:
    """Examples ``start`` .. ``start + n - 1`` of ``split`` ("train" or "test") of ``task``
    (image ``Example`` records for an image task, ``TextExample`` records for a text task,
    ``VideoExample`` records for a video question task)."""
    if task in VIDEO_QA_TASKS:
        from .video_questions import generate_video

        return generate_video(task, split, n, start)
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    example_seed(task, split, start)  # validates names and range
    gen = GENERATORS[task] if task in GENERATORS else TEXT_GENERATORS[task]
    return [gen(np.random.default_rng(list(example_seed(task, split, i)))) for i in range(start, start + n)]


def vocabulary() -> list[str]:
    """Every word that can occur in any image task's questions or answers, sorted
    (:func:`.text.text_vocabulary` for the text tasks)."""
    words: set[str] = {"what", "colour", "shape", "is", "the", "object", "at", "?", "there", "a", "how", "many",
                       "are", "left", "of", "above", "character", "yes", "no"}
    words.update(COLOUR_NAMES, SHAPES, (s + "s" for s in SHAPES), COUNT_WORDS, GLYPHS)
    for name in CELL_NAMES:
        words.update(name.split())
    return sorted(words)


__all__ = ["TASKS", "TEXT_TASKS", "VIDEO_QA_TASKS", "ALL_TASKS", "SPLITS", "Example", "TextExample", "IMAGE_SIZE", "generate", "example_seed", "vocabulary"]
