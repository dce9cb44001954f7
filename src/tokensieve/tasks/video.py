"""Procedural synthetic videos with fixed, disjoint splits: objects that appear, disappear, move or
change colour or shape, between long stretches in which nothing changes.

A clip is ``FRAMES`` frames of the image suite's scenes (:mod:`.scene`: its 96 x 96 canvas, background,
colours, shapes, 3 x 3 grid of 32 px cells and 14 px objects placed on its 8 px slots). Every object has
a track: its state (top-left pixel, colour, shape, visible) in each frame; the frames are rendered from
the tracks and the events are read off them (:func:`events`), so every clip records what happened,
when, and where (evidence frames and cells), whatever generator made it.

Generators (``VIDEO_TASKS``):

* ``change``: the clip-classification task. One actor among 1-3 static distractors (distinct cells)
  does one thing, drawn uniformly from ``CHANGE_CLASSES``: it moves one cell left, right, up or down
  (32 px over 4 or 8 frames, starting at frame 1-8), or changes colour, or changes shape, or appears,
  or disappears (at an odd frame 3-13, so that the frames before and after the change fall in one
  2-frame tubelet of a video ViT). Before and after, the clip is static. No single frame answers it:
  every frame is consistent with several classes.
* ``story``: 2-3 objects of distinct (colour, shape), each doing 1-2 things (appear/disappear runs,
  which may last to the end, one move, one colour change): material for the video questions
  (:func:`questions`, and the question tasks of :mod:`.video_questions`).

Clip ``i`` of split ``s`` of generator ``g`` is drawn from an RNG seeded by (``SEED_TAG`` + the
generator's index, the split's base + ``i``) with the image suite's split bases
(:data:`tokensieve.tasks.SPLITS`), so it is always the same bytes, and no test seed is a train seed;
the tag keeps video seeds apart from the image and text tasks' (which use their task index, < 1000).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import split_seed
from .generators import COLOUR_NAMES
from .scene import (
    BACKGROUND,
    CELL,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    OBJECT_SIZE,
    SHAPES,
    SLOT,
    STEP,
    shape_mask,
)

FRAMES = 16
"""Frames per clip (VideoMAE's 16, i.e. 8 tubelets of 2)."""
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""Move direction -> (row, column) step of one cell."""
CHANGE_CLASSES: tuple[str, ...] = ("moved left", "moved right", "moved up", "moved down",
                                   "changed colour", "changed shape", "appeared", "disappeared")
"""Labels of the ``change`` task, in class-index order."""
VIDEO_TASKS: tuple[str, ...] = ("change", "story")
SEED_TAG = 1000


@dataclass(frozen=True)
class State:
    """One object in one frame: top-left pixel ``(y, x)`` of its 14 px box, colour, shape, visible."""

    y: int
    x: int
    colour: str
    shape: str
    visible: bool = True

    @property
    def cell(self) -> int:
        """The grid cell (row-major, 0..8) holding the box's centre."""
        return (self.y + OBJECT_SIZE // 2) // CELL * GRID + (self.x + OBJECT_SIZE // 2) // CELL


@dataclass(frozen=True)
class Event:
    """Something that changed between frames ``frame - 1`` and ``frame`` (a move: its first frame, and
    ``last`` its last), for object ``item``. ``kind``: "move", "colour", "shape", "appear",
    "disappear"; ``before``/``after``: direction ("left", ...) for a move, the old/new colour or shape."""

    frame: int
    item: int
    kind: str
    before: str | None = None
    after: str | None = None
    last: int | None = None
    cells: tuple[int, ...] = ()


@dataclass
class Clip:
    """One clip. ``frames``: ``(FRAMES, 96, 96, 3)`` uint8 RGB; ``tracks[o][f]``: object ``o`` in
    frame ``f``; ``events`` in frame order; ``label``: the class (``change``) or None (``story``);
    ``evidence_frames`` / ``evidence_cells``: where the label is decided (the labelled event's frames
    ``frame - 1 .. last`` and its cells)."""

    task: str
    frames: np.ndarray
    tracks: tuple[tuple[State, ...], ...]
    events: tuple[Event, ...]
    label: str | None = None
    evidence_frames: tuple[int, ...] = ()
    evidence_cells: tuple[int, ...] = ()


def slot_position(rng: np.random.Generator, cell: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of an object in ``cell`` on one of the scene's 8 px slots (as :func:`.scene.render`)."""
    row, col = divmod(cell, GRID)
    slots = (CELL - SLOT) // STEP + 1
    pad = (SLOT - OBJECT_SIZE) // 2
    return row * CELL + STEP * int(rng.integers(slots)) + pad, col * CELL + STEP * int(rng.integers(slots)) + pad


def render_frames(tracks: tuple[tuple[State, ...], ...]) -> np.ndarray:
    """``(FRAMES, 96, 96, 3)`` uint8: every visible object drawn over the scene background, frame by frame."""
    frames = np.empty((len(tracks[0]), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    masks = {s: shape_mask(s) for s in SHAPES}
    for track in tracks:
        for f, st in enumerate(track):
            if st.visible:
                frames[f, st.y:st.y + OBJECT_SIZE, st.x:st.x + OBJECT_SIZE][masks[st.shape]] = COLOURS[st.colour]
    return frames


def _direction(dy: int, dx: int) -> str:
    return ("down" if dy > 0 else "up") if abs(dy) >= abs(dx) else ("right" if dx > 0 else "left")


def events(tracks: tuple[tuple[State, ...], ...]) -> tuple[Event, ...]:
    """The events of a clip, read off its tracks: a run of consecutive position changes is one move
    (its direction from the net displacement), every other difference between two consecutive frames
    one event; in frame order, then object order."""
    found = []
    for o, track in enumerate(tracks):
        moving = [(a.y, a.x) != (b.y, b.x) for a, b in zip(track, track[1:])]
        for f in range(1, len(track)):
            a, b = track[f - 1], track[f]
            if a.visible != b.visible:
                found.append(Event(f, o, "appear" if b.visible else "disappear", cells=(b.cell,)))
            for kind in ("colour", "shape"):
                if getattr(a, kind) != getattr(b, kind):
                    found.append(Event(f, o, kind, getattr(a, kind), getattr(b, kind), cells=(b.cell,)))
            if moving[f - 1] and (f == 1 or not moving[f - 2]):
                last = f
                while last < len(moving) and moving[last]:
                    last += 1
                end = track[last]
                found.append(Event(f, o, "move", None, _direction(end.y - a.y, end.x - a.x), last, (a.cell, end.cell)))
    return tuple(sorted(found, key=lambda e: (e.frame, e.item)))


def _static(rng: np.random.Generator, cell: int, colour: str | None = None, shape: str | None = None) -> list[State]:
    y, x = slot_position(rng, cell)
    colour = colour or COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    return [State(y, x, colour, shape)] * FRAMES


def _neighbour(cell: int, direction: str) -> int | None:
    (row, col), (dr, dc) = divmod(cell, GRID), DIRECTIONS[direction]
    row, col = row + dr, col + dc
    return row * GRID + col if 0 <= row < GRID and 0 <= col < GRID else None


def _move(track: list[State], direction: str, start: int, duration: int) -> None:
    """Move ``track`` one cell (32 px) in ``direction`` over frames ``start .. start + duration - 1``, in place."""
    dr, dc = DIRECTIONS[direction]
    for f in range(start, FRAMES):
        done = min(f - start + 1, duration) / duration
        base = track[start - 1]
        track[f] = replace(track[f], y=base.y + round(dr * CELL * done), x=base.x + round(dc * CELL * done))


def change(rng: np.random.Generator) -> Clip:
    """One actor does one of ``CHANGE_CLASSES`` (uniform); 1-3 static distractors in other cells."""
    label = CHANGE_CLASSES[int(rng.integers(len(CHANGE_CLASSES)))]
    n_distract = int(rng.integers(1, 4))
    cells = [int(c) for c in rng.permutation(GRID * GRID)]
    if label.startswith("moved"):
        direction = label.split()[1]
        cell = next(c for c in cells if _neighbour(c, direction) is not None)
        target = _neighbour(cell, direction)
        others = [c for c in cells if c not in (cell, target)][:n_distract]
    else:
        cell, others = cells[0], cells[1:1 + n_distract]
    actor = _static(rng, cell)
    if label.startswith("moved"):
        duration = int(rng.choice([4, 8]))
        _move(actor, direction, int(rng.integers(1, FRAMES - duration + 1)), duration)
    else:
        frame = 2 * int(rng.integers(1, FRAMES // 2 - 1)) + 1  # odd: frames frame-1, frame share a tubelet
        if label == "changed colour":
            new = [c for c in COLOUR_NAMES if c != actor[0].colour][int(rng.integers(len(COLOUR_NAMES) - 1))]
            actor[frame:] = [replace(s, colour=new) for s in actor[frame:]]
        elif label == "changed shape":
            new = [s for s in SHAPES if s != actor[0].shape][int(rng.integers(len(SHAPES) - 1))]
            actor[frame:] = [replace(s, shape=new) for s in actor[frame:]]
        else:
            hidden = slice(0, frame) if label == "appeared" else slice(frame, FRAMES)
            actor[hidden] = [replace(s, visible=False) for s in actor[hidden]]
    tracks = (tuple(actor), *(tuple(_static(rng, c)) for c in others))
    found = events(tracks)
    event = found[0]
    return Clip("change", render_frames(tracks), tracks, found, label,
                tuple(range(event.frame - 1, (event.last or event.frame) + 1)), event.cells)


def story(rng: np.random.Generator) -> Clip:
    """2-3 objects of distinct (colour, shape), each doing 1-2 things: blinking (1-2 appear/disappear
    runs), one move to a free neighbouring cell, or one colour change."""
    n = int(rng.integers(2, 4))
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    cells = [int(c) for c in rng.permutation(GRID * GRID)]
    used = set(cells[:n])
    tracks = []
    for o in range(n):
        track = _static(rng, cells[o], *combos[int(picks[o])])
        kinds = rng.permutation(["blink", "move", "colour"])[: int(rng.integers(1, 3))]
        for kind in kinds:
            if kind == "blink":
                for _ in range(int(rng.integers(1, 3))):
                    a = int(rng.integers(0, FRAMES - 3))
                    b = int(rng.integers(a + 1, FRAMES + 2 if a else FRAMES - 1))  # b >= FRAMES: hidden to the end
                    track[a:b] = [replace(s, visible=False) for s in track[a:b]]
            elif kind == "move":
                free = [d for d in DIRECTIONS if _neighbour(cells[o], d) is not None and _neighbour(cells[o], d) not in used]
                if free:
                    direction = free[int(rng.integers(len(free)))]
                    used.add(_neighbour(cells[o], direction))
                    _move(track, direction, int(rng.integers(1, FRAMES - 4)), 4)
            else:
                frame = int(rng.integers(2, FRAMES - 1))
                new = [c for c in COLOUR_NAMES if c != track[frame].colour][int(rng.integers(len(COLOUR_NAMES) - 1))]
                track[frame:] = [replace(s, colour=new) for s in track[frame:]]
        tracks.append(tuple(track))
    tracks_t = tuple(tracks)
    return Clip("story", render_frames(tracks_t), tracks_t, events(tracks_t))


GENERATORS = {"change": change, "story": story}


def clip_seed(task: str, split: str, i: int) -> tuple[int, int]:
    """The RNG seed of clip ``i`` of ``split`` of ``task``: (``SEED_TAG`` + task index, split base + i).

    Raises:
        ValueError: unknown task or split, ``i`` outside ``[0, 2**40)``.
    """
    if task not in VIDEO_TASKS:
        raise ValueError(f"unknown video task {task!r}; valid tasks: {', '.join(VIDEO_TASKS)}")
    return SEED_TAG + VIDEO_TASKS.index(task), split_seed(split, i, "clip")


def generate_clips(task: str, split: str, n: int, start: int = 0) -> list[Clip]:
    """Clips ``start .. start + n - 1`` of ``split`` ("train" or "test") of ``task``.

    Raises:
        ValueError: negative ``n`` or ``start``, or what :func:`clip_seed` refuses.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    clip_seed(task, split, start + max(n - 1, 0))
    return [GENERATORS[task](np.random.default_rng(list(clip_seed(task, split, i)))) for i in range(start, start + n)]


def _name(clip: Clip, item: int) -> str:
    first = clip.tracks[item][0]
    return f"{first.colour} {first.shape}"


def _seen(track: tuple[State, ...], frames: range) -> bool:
    return any(track[f].visible for f in frames)


def questions(clip: Clip) -> list[tuple[str, str, tuple[int, ...]]]:
    """(question, answer, evidence frames) that a single frame cannot answer, about ``clip``'s objects
    (named by their colour and shape in frame 0): which direction each moved, what colour each became,
    how many times each appeared (frame 0 visible counts as an appearance), whether each is present at
    the end, and, of two that appeared, which appeared first (when their first appearances differ).
    A move or colour change is asked about only where the object is seen both before and after it."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    appear_frames: dict[int, list[int]] = {}
    for o, track in enumerate(clip.tracks):
        name = _name(clip, o)
        mine = [e for e in clip.events if e.item == o]
        moves = [e for e in mine if e.kind == "move"]
        if len(moves) == 1 and _seen(track, range(moves[0].frame)) and _seen(track, range(moves[0].last, FRAMES)):
            e = moves[0]
            out.append((f"which direction did the {name} move ?", str(e.after), tuple(range(e.frame - 1, (e.last or e.frame) + 1))))
        colours = [e for e in mine if e.kind == "colour"]
        if colours and _seen(track, range(colours[-1].frame)) and _seen(track, range(colours[-1].frame, FRAMES)):
            out.append((f"what colour did the {name} become ?", str(colours[-1].after), (colours[-1].frame - 1, colours[-1].frame)))
        appear_frames[o] = ([0] if track[0].visible else []) + [e.frame for e in mine if e.kind == "appear"]
        out.append((f"how many times did the {name} appear ?", str(len(appear_frames[o])), tuple(appear_frames[o])))
        out.append((f"is the {name} present at the end ?", "yes" if track[-1].visible else "no", (FRAMES - 1,)))
    for a in range(len(clip.tracks)):
        for b in range(a + 1, len(clip.tracks)):
            fa, fb = appear_frames[a], appear_frames[b]
            if fa and fb and fa[0] != fb[0]:
                first = a if fa[0] < fb[0] else b
                out.append((f"which appeared first , the {_name(clip, a)} or the {_name(clip, b)} ?", _name(clip, first),
                            (min(fa[0], fb[0]), max(fa[0], fb[0]))))
    return out
