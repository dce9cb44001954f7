"""Place the vision tower's per-crop signals on the rows of the LLM's visual tokens.

The tap (:mod:`tokensieve.vision`) captures signals per crop, patch by patch, in the tower's order;
encoder-stage methods see them aligned with the rows of the view, crop by crop. Where each image is
one crop (LLaVA-1.5), an image's N patches are its run of N image tokens. Where the model packs an
image as several crops (LLaVA-NeXT), the tap's :class:`~tokensieve.vision.Packing` of each image says
which of the image's tokens each crop's patches became; the images' tokens follow one another over
the batch's image-token positions, sample by sample, as the model scatters them. Tokens that carry no
patch (LLaVA-NeXT's row-end newlines) get no signal, and patches the packing drops get no row.
"""

from __future__ import annotations

import torch

from .ledger import Rows
from .methods.base import AlignedVision
from .vision import VisionSignals


def align_vision(signals: VisionSignals | None, rows: Rows, image_index: torch.Tensor, method: str) -> AlignedVision:
    """The tap's per-crop signals placed on the rows of each crop's visual tokens.

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
    crop = 0
    for b, positions in enumerate(_crop_positions(signals, image_index)):
        pos = rows.pos[b]
        for where in positions:
            cols = (torch.searchsorted(pos, where.clamp(min=0), right=True) - 1).clamp(min=0)
            cols = torch.where((where >= 0) & (pos[cols] == where) & rows.valid[b, cols], cols, -1)
            alive = cols >= 0
            out.cls_attention[b, cols[alive]] = signals.cls_attention[crop, alive]
            out.keys[b, cols[alive]] = signals.keys[crop, alive]
            out.features[b, cols[alive]] = signals.features[crop, alive]
            out.images[b].append((cols, crop))
            crop += 1
    return out


def _crop_positions(signals: VisionSignals, image_index: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per sample, for each of its crops (in the tower's order), the ``(N,)`` prompt position of each
    patch, -1 where the model's packing drops it.

    Raises:
        ValueError: the tower's crops and patches do not account for the image tokens of the input.
    """
    crops, patches = signals.features.shape[:2]
    mismatch = ValueError("the vision tower's patches do not line up with the image tokens of this input")
    batch = image_index.shape[0]
    out: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    if signals.packing is None:
        for b in range(batch):
            for j in range(int(image_index[b].max().item()) + 1):
                where = (image_index[b] == j).nonzero().squeeze(1)
                if where.numel() != patches:
                    raise mismatch
                out[b].append(where)
    else:
        sample, where = (image_index >= 0).nonzero(as_tuple=True)  # image tokens in the order the model fills them
        if sum(p.tokens for p in signals.packing) != where.numel() or \
                any(p.offsets.shape[1] != patches for p in signals.packing):
            raise mismatch
        start = 0
        for p in signals.packing:
            b, tokens = sample[start], where[start : start + p.tokens]
            if not bool((sample[start : start + p.tokens] == b).all()):
                raise mismatch
            offsets = p.offsets.to(tokens.device)
            out[int(b)] += list(torch.where(offsets >= 0, tokens[offsets.clamp(min=0)], -1))
            start += p.tokens
    if sum(len(c) for c in out) != crops:
        raise mismatch
    return out
