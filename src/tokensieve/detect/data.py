"""Detection scenes from the project's generator, with boxes, classes and exact object masks.

A scene is a 96x96 image of the image suite (:mod:`tokensieve.tasks.scene`): 1-4 coloured shapes
(the objects, any of the 12 colour-shape kinds) in distinct cells of the 3x3 grid, and 0-2 glyphs in
other cells, each in one of the objects' colours (clutter: drawn like objects but not objects, so
background to the detector and to BAViT, which must tell them apart by shape, not colour).

Detection is class-agnostic: one class, ``object``. With the 12 kinds as classes the tiny YOLOS
did not learn to classify on a CPU budget (measured at 7000 of 12000 steps: class cross-entropy
flat at 2.19, the class of matched detections right 12% of the time, chance 8%, while a linear probe
reads the kind off its patch tokens at every layer 100% of the time and off its detection tokens 13%:
the detection tokens locate objects but do not read them), so the classes would only have hidden
what BAViT changes: where the detector finds objects.
Object ``k``'s mask is the set of pixels its own shape painted, known exactly from the renderer, so
the foreground/background label of every patch is exact. Scene ``i`` of a split is drawn from an RNG
seeded by (``SEED_KEY``, split base + i), with the split bases of :data:`tokensieve.tasks.SPLITS`,
so train and test never share a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..tasks import split_seed
from ..tasks.glyphs import GLYPHS
from ..tasks.scene import COLOURS, GRID, IMAGE_SIZE, SHAPES, Item, item_mask, render

SEED_KEY = 7001
"""First seed word of every detection scene (distinct from the image and text tasks' indices)."""
KINDS: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
"""What an object can be (colour and shape)."""
CLASSES: tuple[str, ...] = ("object",)
"""The detector's classes, index = label."""
MAX_OBJECTS = 4
MAX_CLUTTER = 2
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's normalisation, as the rest of the project uses (the background maps to ~0)."""


@dataclass(frozen=True)
class Scene:
    """One image with its objects: ``boxes`` (n, 4) pixel (x0, y0, x1, y1) with x1/y1 exclusive,
    ``labels`` (n,) class indices into :data:`CLASSES`, ``foreground`` (96, 96) bool: object pixels,
    ``kinds`` (n,) what each object is (:data:`KINDS`)."""

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    foreground: np.ndarray
    kinds: tuple[str, ...] = ()


def scene(split: str, i: int) -> Scene:
    """Scene ``i`` of ``split`` ("train" or "test").

    Raises:
        ValueError: unknown split or index out of range.
    """
    rng = np.random.default_rng([SEED_KEY, split_seed(split, i, "scene")])
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    n_clutter = int(rng.integers(0, MAX_CLUTTER + 1))
    cells = [int(c) for c in rng.permutation(GRID * GRID)[: n_objects + n_clutter]]
    kinds = tuple(KINDS[int(k)] for k in rng.integers(len(KINDS), size=n_objects))
    items = [Item(cell, *kind.split()) for cell, kind in zip(cells, kinds)]
    colours = list(COLOURS)
    items += [Item(cell, colour=colours[int(rng.integers(len(colours)))], glyph=GLYPHS[int(rng.integers(len(GLYPHS)))])
              for cell in cells[n_objects:]]
    image, boxes = render(items, rng)
    foreground = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for item, (x0, y0, x1, y1) in zip(items[:n_objects], boxes):
        foreground[y0:y1, x0:x1] |= item_mask(item)
    return Scene(image, np.array(boxes[:n_objects], dtype=np.float32), np.zeros(n_objects, dtype=np.int64), foreground,
                 kinds)


def scenes(split: str, n: int, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of ``split``."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    return [scene(split, i) for i in range(start, start + n)]


def pixels(batch: list[Scene]) -> torch.Tensor:
    """``(B, 3, 96, 96)`` float32, normalised."""
    array = np.stack([np.asarray(s.image, dtype=np.float32) / 255.0 for s in batch])
    x = torch.from_numpy(array).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def targets(batch: list[Scene]) -> list[dict[str, torch.Tensor]]:
    """DETR-style targets, as ``YolosForObjectDetection(labels=...)`` takes them: per scene
    ``class_labels`` (n,) and ``boxes`` (n, 4) as (centre x, centre y, width, height) / image size."""
    out = []
    for s in batch:
        b = torch.from_numpy(s.boxes) / IMAGE_SIZE
        centre = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
        out.append({"class_labels": torch.from_numpy(s.labels), "boxes": centre})
    return out


def patch_labels(batch: list[Scene], patch: int, min_share: float = 0.0) -> torch.Tensor:
    """``(B, (96 / patch) ** 2)`` bool, row-major: a patch is foreground when it holds an object pixel and
    at least ``min_share`` of its pixels are object pixels (the default 0: any object pixel will do).

    Raises:
        ValueError: a patch size that does not divide the image, or ``min_share`` outside [0, 1).
    """
    if patch < 1 or IMAGE_SIZE % patch:
        raise ValueError(f"patch size {patch} does not divide the {IMAGE_SIZE}-pixel image")
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    side = IMAGE_SIZE // patch
    masks = torch.from_numpy(np.stack([s.foreground for s in batch])).float()
    share = masks.view(len(batch), side, patch, side, patch).mean(dim=(2, 4))
    return ((share > 0) & (share >= min_share)).flatten(1)
