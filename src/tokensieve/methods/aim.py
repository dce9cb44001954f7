"""AIM: merge similar visual tokens before the LLM, then drop them progressively by PageRank importance.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025
(arXiv 2412.03248); authors' code LaVi-Lab/AIM.

1. Merge (encoder stage): bipartite matching on the projected visual tokens (L2-normalised features
   as the metric, even-indexed tokens as sources, odd as destinations); the r most similar sources
   merge into their destination by averaging (destination and its sources, unweighted); rounds with
   r = half of what remains, then a quarter, ... until ``merge_keep`` of the tokens remain (0.25: two
   rounds, the release's setting).
2. Prune (prefill): from layer ``start`` to ``stop`` the kept fraction of the merged visual tokens falls
   linearly to 0 (published for 28 layers: 1 - (l - 13) x 0.125 at l = 14..21). At each such layer
   the importance of a token is PageRank on that layer's attention: M = softmax(logits / 0.1), a
   uniform start vector, five steps dist <- dist M, then the root mean square over heads; text tokens
   are never dropped.
Choices made here: tokens ranked at layer l leave at the boundary after it (the release masks them in
the attention mask); merged tokens keep the destination's position (the release reorders them);
``start``/``stop`` default to the published 14/28 and 21/28 of the depth; ``flops`` solves
``merge_keep`` for the budget with the pruning schedule fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, Point, Selection, View, check_budget, check_fraction, top_visual
from .schedule import solve_scale

PAGERANK_TEMPERATURE = 0.1
PAGERANK_STEPS = 5


def average_merge(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` survivors of ``x`` (``(N, d)``) and their merged rows, by rounds of
    bipartite matching with unweighted averaging. Returns ``(index, rows)``."""
    index = torch.arange(x.shape[0])
    x = x.float()
    while index.numel() > k:
        n = index.numel()
        r = min(n // 2, n - k)
        src, dst = torch.arange(0, n, 2), torch.arange(1, n, 2)
        metric = torch.nn.functional.normalize(x, dim=-1)
        best, match = (metric[src] @ metric[dst].T).max(1)
        merged_src = best.argsort(descending=True)[:r]
        sums = x.clone()
        counts = torch.ones(n)
        sums.index_add_(0, dst[match[merged_src]], x[src[merged_src]])
        counts.index_add_(0, dst[match[merged_src]], torch.ones(r))
        survive = torch.ones(n, dtype=torch.bool)
        survive[src[merged_src]] = False
        x = (sums / counts[:, None])[survive]
        index = index[survive]
    return index, x


def pagerank(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` importance from attention ``probs`` (``(B, H, n, n)``): PageRank steps from a uniform
    start over the valid rows, then root mean square over heads."""
    dist = valid.float() / valid.float().sum(1, keepdim=True)
    dist = dist[:, None, None, :].expand(-1, probs.shape[1], 1, -1)
    for _ in range(PAGERANK_STEPS):
        dist = dist @ probs
    return dist[:, :, 0].pow(2).mean(1).sqrt()


@dataclass
class AIM(Method):
    """Options: ``merge_keep`` fraction after merging (or ``flops``), ``start`` and ``stop`` layers."""

    merge_keep: float = 0.25
    start: int | None = None
    stop: int | None = None
    flops: float | None = None
    _merged: dict[int, int] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "aim"
    stages: ClassVar[tuple[str, ...]] = ("encoder", "prefill")
    paper: ClassVar[str] = "Zhong et al., AIM: Adaptive Inference of MLLMs via Token Merging and Pruning, ICCV 2025"
    needs: ClassVar[tuple[str, ...]] = ("projected visual tokens", "attention")

    def bind(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.start = round(num_layers * 14 / 28) if self.start is None else int(self.start)
        self.stop = round(num_layers * 21 / 28) if self.stop is None else int(self.stop)
        if not 0 <= self.start <= self.stop < num_layers:
            raise ValueError(f"need 0 <= start <= stop < {num_layers}, got start={self.start}, stop={self.stop}")

    def validate(self) -> None:
        check_fraction("merge_keep", self.merge_keep)
        check_budget(None, self.flops)

    def _fraction(self, layer: int) -> float:
        return max(0.0, 1 - (layer - self.start + 1) / (self.stop - self.start + 1))

    def points(self) -> list[Point]:
        encoder = [Point(before=0, stage="encoder")]
        return encoder + [Point(before=l + 1, attention_layer=l) for l in range(self.start, min(self.stop + 1, self.num_layers - 1))]

    def _visual(self, n_visual: int, merge_keep: float) -> list[int]:
        merged = max(1, round(merge_keep * n_visual))
        counts, n = [], merged
        for layer in range(self.num_layers):
            if self.start < layer <= self.stop + 1:
                n = min(n, round(self._fraction(layer - 1) * merged))
            counts.append(n)
        return counts

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = self._visual(n_visual, self.merge_keep)
        return counts, list(counts)

    def select(self, view: View) -> Selection:
        if view.point.stage == "encoder":
            return self._merge(view)
        scores = pagerank(view.attention("all", temperature=PAGERANK_TEMPERATURE), view.query_valid("all"))
        fraction = self._fraction(view.point.before - 1)
        counts = [round(fraction * self._merged.get(b, n)) for b, n in enumerate(view.visual.sum(1).tolist())]
        return Selection(keep=top_visual(scores, view.visual, counts))

    def _merge(self, view: View) -> Selection:
        keep = ~view.visual
        hidden = view.hidden.clone()
        self._merged = {}
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if cand.numel() == 0:
                continue
            share = self.merge_keep
            if self.flops is not None:
                text = int(view.query_valid("all")[b].sum()) - cand.numel()
                share = solve_scale(view.shape, cand.numel(), text, lambda c: self._visual(cand.numel(), c), self.flops,
                                    f"aim pruning layers {self.start}..{self.stop}")
            k = max(1, round(share * cand.numel()))
            index, rows = average_merge(view.hidden[b, cand].cpu(), k)
            hidden[b, cand[index.to(cand.device)]] = rows.to(hidden)
            keep[b, cand[index.to(cand.device)]] = True
            self._merged[b] = k
        return Selection(keep=keep, hidden=hidden)
