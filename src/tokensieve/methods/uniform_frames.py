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
import torch

from .frames import FramePruner


def sampled_frames(total: int, kept: int) -> list[int]:
    """``kept`` of ``total`` frame indices, evenly spaced, first and last included when ``kept >= 2``."""
    return sorted({int(i) for i in np.linspace(0, total - 1, max(1, min(kept, total)), dtype=int)})


@dataclass
class UniformFrames(FramePruner):
    """Options: ``keep`` fraction of frames (default 0.5) or ``flops``, ``positions``."""

    name: ClassVar[str] = "uniform-frames"
    paper: ClassVar[str] = "baseline: uniform frame subsampling (np.linspace over the frames)"
    needs: ClassVar[tuple[str, ...]] = ("frames", "grid")

    def kept(self, frames: torch.Tensor, budget: int | None) -> torch.Tensor:
        count, tokens = frames.shape[0], frames.shape[1]
        n = max(1, round(self.keep * count)) if budget is None else max(1, budget // tokens)
        mask = torch.zeros(count, tokens, dtype=torch.bool, device=frames.device)
        mask[sampled_frames(count, n)] = True
        return mask.flatten()
