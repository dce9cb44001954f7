"""Place the vision tower's per-image signals on the rows of the LLM's visual tokens.

The tap (:mod:`tokensieve.vision`) captures signals per image, patch by patch, in the tower's order;
encoder-stage methods see them aligned with the rows of the view, image by image.
"""

from __future__ import annotations

import torch

from .ledger import Rows
from .methods.base import AlignedVision
from .vision import VisionSignals


def align_vision(signals: VisionSignals | None, rows: Rows, image_index: torch.Tensor, method: str) -> AlignedVision:
    """The tap's per-image signals placed on the rows of each image's visual tokens.

    Args:
        signals: the tap's capture of this forward (None when the tower did not run).
        rows: the view's rows, ``(B, n)`` original positions.
        image_index: ``(B, T)`` per-sample image number of each prompt position, -1 elsewhere.
        method: the method's name, for the error message.
    """
    if signals is None:
        raise ValueError(f"{method} needs the vision tower to run in this forward (pass pixel_values)")
    batch, n = rows.pos.shape
    out = AlignedVision(
        cls_attention=signals.cls_attention.new_zeros(batch, n),
        keys=signals.keys.new_zeros(batch, n, signals.keys.shape[-1]),
        features=signals.features.new_zeros(batch, n, signals.features.shape[-1]),
        images=[[] for _ in range(batch)],
        raw=signals,
    )
    image = 0
    for b in range(batch):
        for j in range(int(image_index[b].max().item()) + 1):
            positions = (image_index[b] == j).nonzero().squeeze(1)
            if image >= signals.features.shape[0] or positions.numel() != signals.features.shape[1]:
                raise ValueError("the vision tower's patches do not line up with the image tokens of this input")
            cols = torch.searchsorted(rows.pos[b], positions, right=True) - 1
            out.cls_attention[b, cols] = signals.cls_attention[image]
            out.keys[b, cols] = signals.keys[image]
            out.features[b, cols] = signals.features[image]
            out.images[b].append((cols, image))
            image += 1
    return out
