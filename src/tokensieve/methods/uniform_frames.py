"""Uniform frame subsampling: the temporal baseline every video LLM pipeline starts from.

A sample's ``T`` frames keep ``F = max(1, round(keep * T))`` of them, evenly spread and both ends
included, ``numpy.linspace(0, T - 1, F)`` truncated to integers, as video LLM loaders sample frames
(LLaVA-NeXT ``playground/demo/video_demo.py`` and lmms-eval's video loaders:
``np.linspace(0, total_frames - 1, n, dtype=int)``); every token of a kept frame stays, every token of
another goes. ``flops``: the most frames whose tokens meet the target. Positions: ``"auto"``
renumbers the shorter prompt, as when the model is fed fewer frames (original positions on M-RoPE
models). A "frame" is one of the adapter's frame grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import EncoderPruner, Selection, View, kept_counts
from .frames import frame_rows, off_frames


def sampled_frames(total: int, kept: int) -> list[int]:
    """``kept`` of ``total`` frame indices, evenly spaced, first and last included when ``kept >= 2``."""
    return sorted({int(i) for i in np.linspace(0, total - 1, max(1, min(kept, total)), dtype=int)})


@dataclass
class UniformFrames(EncoderPruner):
    """Options: ``keep`` fraction of frames (default 0.5) or ``flops``, ``positions``."""

    name: ClassVar[str] = "uniform-frames"
    paper: ClassVar[str] = "baseline: uniform frame subsampling (np.linspace over the frames)"
    needs: ClassVar[tuple[str, ...]] = ("frames", "grid")

    def select(self, view: View) -> Selection:
        keep = off_frames(view)
        budgets = kept_counts(view, 0, self.keep, self.flops) if self.flops is not None else None
        for b in range(keep.shape[0]):
            index = frame_rows(view, b)
            if index is None:
                continue
            frames, tokens = index.shape
            count = max(1, round(self.keep * frames)) if budgets is None else max(1, budgets[b] // tokens)
            keep[b, index[sampled_frames(frames, count)].flatten()] = True
        return Selection(keep=keep)
