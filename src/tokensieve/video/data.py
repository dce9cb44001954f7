"""Clip classification on the project's video generator: what the actor of a ``change`` clip did.

The clips are :func:`tokensieve.tasks.video.change`'s: 16 frames of 96 x 96, one actor among 1-3
static distractors that moves one cell (left, right, up, down), changes colour or shape, appears or
disappears, in an otherwise static clip; the label is one of its 8 ``CHANGE_CLASSES`` (uniform). No
single frame decides it, and most of every clip is static background and unchanged objects: the
temporal redundancy STA removes. Test items are the ``test`` split's first ``n``; training draws from
the ``train`` split.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tasks.scene import CELL, GRID, IMAGE_SIZE
from ..tasks.video import CHANGE_CLASSES, FRAMES, Clip, generate_clips

TASK = "change"
LABELS: tuple[str, ...] = CHANGE_CLASSES
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's normalisation, as the image classifiers use (the scene background maps to ~0)."""


def to_tensor(clips: list[Clip]) -> torch.Tensor:
    """``(B, T, 3, H, W)`` float32, normalised: VideoMAE's ``pixel_values`` layout (frames, then channels)."""
    array = np.stack([c.frames for c in clips]).astype(np.float32) / 255.0
    x = torch.from_numpy(array).permute(0, 1, 4, 2, 3)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def label(clip: Clip) -> int:
    """Class index of a clip."""
    return LABELS.index(str(clip.label))


def evidence_tokens(clips: list[Clip], tubelet: int = 2, patch: int = 16) -> torch.Tensor:
    """``(B, T * N)`` bool: the tokens (time-major) of the tubelets holding a clip's evidence frames after
    the first (the frames in which the change shows) and the patches covering its evidence cells."""
    side = IMAGE_SIZE // patch
    per_cell = CELL // patch
    mask = torch.zeros(len(clips), FRAMES // tubelet, side, side, dtype=torch.bool)
    for i, clip in enumerate(clips):
        tubelets = sorted({f // tubelet for f in clip.evidence_frames[1:]})
        for cell in clip.evidence_cells:
            row, col = divmod(cell, GRID)
            for t in tubelets:
                mask[i, t, row * per_cell:(row + 1) * per_cell, col * per_cell:(col + 1) * per_cell] = True
    return mask.flatten(1)


def batch(split: str, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``start .. start + n - 1`` of ``split``: ``(pixel_values (B, T, 3, H, W), labels (B,))``."""
    clips = generate_clips(TASK, split, n, start)
    return to_tensor(clips), torch.tensor([label(c) for c in clips])
