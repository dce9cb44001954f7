"""EVS (Efficient Video Sampling): keep the video tokens that changed most since the previous frame.

Bagrov et al., "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM
Inference", arXiv 2510.14624; the rule as vLLM serves it (``--video-pruning-rate``), vllm-project/vllm
``vllm/multimodal/evs.py`` (``compute_retention_mask``, ``compute_retained_tokens_count``), read at
commit 094f117.

Per video of ``T`` frames of ``P`` tokens each (the projected embeddings, frame by frame, row-major):

    d[0, p] = 255                                  (frame 0 is kept whole: above any dissimilarity)
    d[t, p] = 1 - cos(e[t, p], e[t - 1, p])        (t >= 1: change at the same grid cell)
    N       = max(P, int(T * P * (1 - q)))          (q: the pruning rate)
    keep the N largest d over all frames together (one global ranking, no per-frame budget; ties go
    to the earlier flat index, as a stable descending sort), in their original order.

Budget: ``keep`` is ``1 - q`` (default 0.5: vLLM's rate is user-given); ``flops`` finds the most tokens
that meet the target (all of a sample's frames as one video), then takes ``max(P, that)``. Here a
"frame" is one of the adapter's frame grids (LLaVA-NeXT-Video: each frame's pooled grid); a sample
with one frame keeps it whole. Positions: ``"auto"`` renumbers the shorter prompt (vLLM recomputes
the kept tokens' positions; on M-RoPE models original positions are kept, as its
``recompute_mrope_positions`` keeps each token's grid coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .frames import FramePruner

FIRST_FRAME = 255.0
"""vLLM's dissimilarity of frame 0's tokens, above the largest possible ``1 - cos`` (2)."""


def retained_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """``max(P, int(T * P * (1 - q)))``: tokens a video keeps at pruning rate ``q``."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def dissimilarity(frames: torch.Tensor) -> torch.Tensor:
    """``(T, P, d)`` frame embeddings -> ``(T * P,)`` float32: ``FIRST_FRAME`` for frame 0, then
    ``1 - cos`` with the same cell of the previous frame."""
    x = frames.float()
    change = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)
    first = torch.full_like(x[:1, :, 0], FIRST_FRAME)
    return torch.cat([first, change]).flatten()


def retained(frames: torch.Tensor, count: int) -> torch.Tensor:
    """``(T * P,)`` bool: the ``count`` most changed tokens of ``frames`` ``(T, P, d)``."""
    score = dissimilarity(frames)
    order = torch.sort(score, descending=True, stable=True).indices[:count]
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[order] = True
    return mask


@dataclass
class EVS(FramePruner):
    """Options: ``keep`` (``1 - q``, default 0.5) or ``flops``, ``positions``."""

    name: ClassVar[str] = "evs"
    paper: ClassVar[str] = "Bagrov et al., Efficient Video Sampling (EVS), arXiv 2510.14624; vLLM multimodal/evs.py"
    needs: ClassVar[tuple[str, ...]] = ("frames", "grid")

    def kept(self, frames: torch.Tensor, budget: int | None) -> torch.Tensor:
        count, tokens = frames.shape[0], frames.shape[1]
        n = retained_count(tokens, count, 1 - self.keep) if budget is None else max(tokens, budget)
        return retained(frames, n)
