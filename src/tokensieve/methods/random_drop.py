"""Random visual-token dropping: the floor every method must beat.

Keeps a seeded uniform random ``keep`` fraction of each sample's visual tokens, either before the LLM
(``layer=0``, encoder stage) or at the input of decoder layer ``layer``. Text tokens are never dropped.
Each sample draws from its own generator seeded with ``seed``, so a sample gets the same tokens alone
or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Point, Selection, View, budget_keep, check_layer, kept_counts, layer_schedule, top_visual


@dataclass
class RandomDrop(Method):
    """Options: ``keep`` fraction of visual tokens kept (default 0.5) or ``flops`` target ratio,
    ``layer`` (0 = before the LLM), ``seed``."""

    keep: float | None = None
    layer: int = 0
    seed: int = 0
    flops: float | None = None

    name: ClassVar[str] = "random"
    stages: ClassVar[tuple[str, ...]] = ("encoder", "prefill")
    paper: ClassVar[str] = "baseline: uniform random token dropping"

    def validate(self) -> None:
        self.keep = budget_keep(self.keep, self.flops)

    def bind(self, num_layers: int) -> None:
        check_layer("layer", self.layer, num_layers)

    def points(self) -> list[Point]:
        return [Point(before=self.layer, stage="encoder" if self.layer == 0 else "prefill")]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        return layer_schedule(num_layers, n_visual, self.layer, self.keep)

    def select(self, view: View) -> Selection:
        scores = torch.zeros(view.visual.shape)
        for b in range(scores.shape[0]):
            cand = view.visual[b].cpu()
            gen = torch.Generator().manual_seed(self.seed)
            scores[b, cand] = torch.rand(int(cand.sum()), generator=gen)
        scores = scores.to(view.hidden.device)
        return Selection(keep=top_visual(scores, view.visual, kept_counts(view, self.layer, self.keep, self.flops)))
