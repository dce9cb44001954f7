"""Frames of a video as video methods see them: the adapter's frame grids, in time order, and the base
of the encoder-stage methods that choose among a video's tokens frame-wise (EVS, uniform frames)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EncoderPruner, Selection, View, kept_counts


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


@dataclass
class FramePruner(EncoderPruner):
    """An encoder-stage video method that only decides which of a video's tokens stay: a subclass
    writes :meth:`kept`; this base finds each sample's frames, turns a ``flops`` budget into a token
    count, and leaves text and visual tokens on no frame alone."""

    def kept(self, frames: torch.Tensor, budget: int | None) -> torch.Tensor:
        """``frames`` ``(T, P, d)`` projected tokens -> ``(T * P,)`` bool, the tokens kept; ``budget`` the
        most tokens a ``flops`` target allows, None when ``keep`` rules."""
        raise NotImplementedError

    def select(self, view: View) -> Selection:
        keep = off_frames(view)
        budgets = kept_counts(view, 0, self.keep, self.flops) if self.flops is not None else None
        for b in range(keep.shape[0]):
            index = frame_rows(view, b)
            if index is not None:
                keep[b, index.flatten()[self.kept(view.hidden[b, index], None if budgets is None else budgets[b])]] = True
        return Selection(keep=keep)
