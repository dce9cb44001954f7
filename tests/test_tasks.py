"""Task generators: determinism, split disjointness, and answers checked independently from pixels."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from tokensieve.tasks import TASKS, example_seed, generate, vocabulary
from tokensieve.tasks.glyphs import GLYPHS, glyph_bitmap
from tokensieve.tasks.scene import BACKGROUND, CELL, CELL_NAMES, COLOURS, INK

N = 60


def components(pixels: np.ndarray) -> list[dict]:
    """4-connected components of non-background pixels: colour name, shape guess, centroid (x, y), box."""
    fg = np.any(pixels != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
    seen = np.zeros_like(fg)
    out = []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        queue, pts = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(pts).T
        rgb = tuple(int(v) for v in pixels[ys[0], xs[0]])
        colour = next((name for name, c in COLOURS.items() if c == rgb), "ink" if rgb == INK else "?")
        fill = len(pts) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
        out.append({"colour": colour, "shape": shape, "cx": xs.mean(), "cy": ys.mean(), "n": len(pts),
                    "box": (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)})
    return out


def in_cell(comp: dict, cell_name: str) -> bool:
    row, col = divmod(CELL_NAMES.index(cell_name), 3)
    return int(comp["cy"] // CELL) == row and int(comp["cx"] // CELL) == col


def cell_of(question: str) -> str:
    return question.split(" at ")[1].removesuffix(" ?")


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task: str) -> None:
    a, b = generate(task, "test", 5, start=7), generate(task, "test", 5, start=7)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.question, x.answer, x.boxes) == (y.question, y.answer, y.boxes)
    assert generate(task, "test", 1, start=9)[0].image.tobytes() == a[2].image.tobytes()


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint(task: str) -> None:
    train = {example_seed(task, "train", i) for i in range(1000)}
    test = {example_seed(task, "test", i) for i in range(1000)}
    assert not train & test
    train_bytes = {e.image.tobytes() for e in generate(task, "train", 30)}
    assert not train_bytes & {e.image.tobytes() for e in generate(task, "test", 30)}


def test_unknown_task_and_split() -> None:
    with pytest.raises(ValueError, match="valid tasks: attribute"):
        generate("nope", "train", 1)
    with pytest.raises(ValueError, match="valid splits"):
        generate("counting", "val", 1)


def test_example_fields() -> None:
    for task in TASKS:
        for e in generate(task, "train", 10):
            assert e.task == task and e.image.mode == "RGB" and e.image.size == (96, 96)
            assert len(e.answer.split()) == 1
            assert all(0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 for x0, y0, x1, y1 in e.boxes)
            assert set(e.question.split()) | {e.answer} <= set(vocabulary())


def test_attribute_from_pixels() -> None:
    for e in generate("attribute", "test", N):
        comps = [c for c in components(np.asarray(e.image)) if in_cell(c, cell_of(e.question))]
        assert len(comps) == 1
        key = "colour" if e.question.startswith("what colour") else "shape"
        assert comps[0][key] == e.answer


@pytest.mark.parametrize("task", ["existence", "relation"])
def test_yes_no_balanced(task: str) -> None:
    answers = [e.answer for e in generate(task, "train", 400)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_existence_from_pixels() -> None:
    for e in generate("existence", "test", N):
        _, _, _, colour, shape, _ = e.question.split()
        found = any(c["colour"] == colour and c["shape"] == shape for c in components(np.asarray(e.image)))
        assert e.answer == ("yes" if found else "no")


def test_counting_from_pixels() -> None:
    seen = set()
    for e in generate("counting", "test", N):
        shape = e.question.split()[2].removesuffix("s")
        comps = components(np.asarray(e.image))
        assert any(c["shape"] != shape for c in comps), "counting images carry distractors"
        assert str(sum(c["shape"] == shape for c in comps)) == e.answer
        seen.add(e.answer)
    assert seen == {"0", "1", "2", "3", "4", "5"}


def test_relation_from_pixels() -> None:
    for e in generate("relation", "test", N):
        words = e.question.removeprefix("is the ").removesuffix(" ?").split()
        ca, sa, rel, cb, sb = words[0], words[1], " ".join(words[2:-3]), words[-2], words[-1]
        comps = components(np.asarray(e.image))
        a = [c for c in comps if (c["colour"], c["shape"]) == (ca, sa)]
        b = [c for c in comps if (c["colour"], c["shape"]) == (cb, sb)]
        assert len(a) == 1 and len(b) == 1 and len(comps) >= 3
        truth = a[0]["cx"] < b[0]["cx"] if rel == "left of" else a[0]["cy"] < b[0]["cy"]
        assert e.answer == ("yes" if truth else "no")


def test_detail_from_pixels() -> None:
    for e in generate("detail", "test", N):
        x0, y0 = 32 * (CELL_NAMES.index(cell_of(e.question)) % 3), 32 * (CELL_NAMES.index(cell_of(e.question)) // 3)
        region = np.all(np.asarray(e.image)[y0 : y0 + 32, x0 : x0 + 32] == INK, axis=-1)
        ys, xs = np.nonzero(region)
        assert len(ys), "an ink glyph is drawn in the named cell"
        # glyphs are 5x7 drawn at scale 2; blank edge columns/rows shrink the ink box, so try every placement
        matches = set()
        for char in GLYPHS:
            big = np.kron(glyph_bitmap(char), np.ones((2, 2), dtype=bool))
            for oy in range(0, 32 - 14 + 1):
                for ox in range(0, 32 - 10 + 1):
                    canvas = np.zeros((32, 32), dtype=bool)
                    canvas[oy : oy + 14, ox : ox + 10] = big
                    if np.array_equal(canvas, region):
                        matches.add(char)
        assert matches == {e.answer}
