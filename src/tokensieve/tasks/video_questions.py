"""The video question tasks of the video VLM: one question about a ``story`` clip (:mod:`.video`) per
item, of one kind per task, none answerable from a single frame.

==================  ==========================================================  ==================
task                question                                                    answers
==================  ==========================================================  ==================
``video-direction`` which direction did the {object} move ?                     left/right/up/down
``video-colour``    what colour did the {object} become ?                       a colour
``video-count``     how many times did the {object} appear ?                    1, 2, 3
``video-end``       is the {object} present at the end ?                        yes / no (half each)
``video-order``     which appeared first , the {object} or the {object} ?       an object (2 words)
==================  ==========================================================  ==================

Objects are named by their colour and shape in frame 0. Item ``i`` of split ``s`` of task ``t`` comes
from an RNG seeded by (``SEED_TAG`` + the task's index, the split's base + ``i``): it draws ``story``
clips until one holds a question of the task's kind (for ``video-end``, first a fair coin for the
answer, then a clip with a question of that answer) and picks one of them uniformly, so the item is
always the same bytes and no test item shares a seed with a training item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import VIDEO_QA_TASKS, split_seed
from .video import FRAMES, Clip, questions, story

SEED_TAG = 1100
"""Apart from the image and text tasks' first seed words (< 1000) and the clip generators' (1000 + i)."""
_OPENINGS = {"video-direction": "which direction", "video-colour": "what colour", "video-count": "how many",
             "video-end": "is the", "video-order": "which appeared"}


@dataclass
class VideoExample:
    """One video question. ``frames``: ``(FRAMES, 96, 96, 3)`` uint8 RGB; ``answer``: one word (two for
    ``video-order``: an object's colour and shape); ``evidence_frames``: the frames that decide it;
    ``clip``: the clip it asks about (tracks and events, for further questions)."""

    task: str
    frames: np.ndarray
    question: str
    answer: str
    evidence_frames: tuple[int, ...]
    clip: Clip


def kind(question: str) -> str:
    """The task whose kind ``question`` is (one of ``VIDEO_QA_TASKS``).

    Raises:
        ValueError: a question of none of the kinds.
    """
    for task, opening in _OPENINGS.items():
        if question.startswith(opening):
            return task
    raise ValueError(f"not a video question: {question!r}")


def video_item(task: str, rng: np.random.Generator) -> VideoExample:
    """One item of ``task`` drawn from ``rng`` (see the module docstring)."""
    wanted = ("yes" if rng.integers(2) else "no") if task == "video-end" else None
    while True:
        clip = story(rng)
        found = [q for q in questions(clip) if kind(q[0]) == task and wanted in (None, q[1])]
        if found:
            question, answer, frames = found[int(rng.integers(len(found)))]
            return VideoExample(task, clip.frames, question, answer, frames, clip)


def video_seed(task: str, split: str, i: int) -> tuple[int, int]:
    """The RNG seed of item ``i`` of ``split`` of ``task``.

    Raises:
        ValueError: unknown task or split, ``i`` outside ``[0, 2**40)``.
    """
    if task not in VIDEO_QA_TASKS:
        raise ValueError(f"unknown video task {task!r}; valid tasks: {', '.join(VIDEO_QA_TASKS)}")
    return SEED_TAG + VIDEO_QA_TASKS.index(task), split_seed(split, i)


def generate_video(task: str, split: str, n: int, start: int = 0) -> list[VideoExample]:
    """Items ``start .. start + n - 1`` of ``split`` ("train" or "test") of ``task``.

    Raises:
        ValueError: negative ``n`` or ``start``, or what :func:`video_seed` refuses.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    video_seed(task, split, start + max(n - 1, 0))
    return [video_item(task, np.random.default_rng(list(video_seed(task, split, i)))) for i in range(start, start + n)]


def video_vocabulary() -> list[str]:
    """Every word of every video question and answer, sorted."""
    from .generators import COLOUR_NAMES, COUNT_WORDS
    from .scene import SHAPES
    from .video import DIRECTIONS

    words = {w for opening in _OPENINGS.values() for w in opening.split()}
    words.update(("did", "the", "move", "become", "times", "appear", "present", "at", "end", "first", ",", "or", "?",
                  "yes", "no"))
    words.update(COLOUR_NAMES, SHAPES, DIRECTIONS, COUNT_WORDS[1:4])
    return sorted(words)


__all__ = ["FRAMES", "VIDEO_QA_TASKS", "VideoExample", "generate_video", "kind", "video_vocabulary"]
