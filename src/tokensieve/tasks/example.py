"""The Example record shared by all tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from .scene import Item


@dataclass
class Example:
    """One image question.

    ``image`` is a 96x96 PIL RGB image; ``answer`` is a single word; ``boxes`` are
    pixel boxes (x0, y0, x1, y1), x1/y1 exclusive, of the objects the answer depends on;
    ``items`` lists everything drawn (cell, colour, shape or glyph), for asking further questions.
    """

    task: str
    image: Image.Image
    question: str
    answer: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    items: tuple[Item, ...] = ()
