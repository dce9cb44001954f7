"""Frames of a video as video methods see them: the adapter's frame grids, in time order."""

from __future__ import annotations

import torch

from .base import View


def frame_rows(view: View, b: int) -> torch.Tensor | None:
    """``(T, P)`` long: the view rows of sample ``b``'s ``T`` frames of ``P`` tokens (row-major), or
    None when the sample has no frame.

    Raises:
        ValueError: frames of different sizes.
    """
    frames = view.grids[b]
    if not frames:
        return None
    sizes = {g.index.numel() for g in frames}
    if len(sizes) != 1:
        raise ValueError(f"the frames of a video must have one size, got {sorted(sizes)} tokens")
    return torch.stack([g.index for g in frames])


def off_frames(view: View) -> torch.Tensor:
    """``(B, n)`` bool: the rows a video method leaves alone, text and visual tokens on no frame
    (an image beside a video)."""
    keep = view.visual.clone()
    for b, frames in enumerate(view.grids):
        for g in frames:
            keep[b, g.index] = False
    return keep | ~view.visual
