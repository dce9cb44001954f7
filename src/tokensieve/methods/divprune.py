"""DivPrune: keep the most diverse visual tokens (greedy max-min diversity), before the LLM.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(arXiv 2503.02175); authors' code vbdi/divprune.

Algorithm, per sample, on the projected visual tokens x_1..x_N (the LLM's input embeddings):
    d(i, j) = 1 - cos(x_i, x_j)
    first pick: the token whose nearest neighbour is farthest, argmax_i min_{j != i} d(i, j)
    then, k - 1 times: add argmax over unselected i of min_{s in S} d(i, s)
kept in their original order. The running minimum makes it O(kN) after the N x N distances.
Positions: ``"auto"`` (default) renumbers the shorter prompt contiguously as the authors' LLaVA code
does, except on M-RoPE models where original positions are kept. ``scope`` (the release handles one
image per prompt, so it leaves this open): ``"all"`` (default) pools all of a sample's visual tokens,
every image or video frame together (across frames, for a video); ``"frame"`` runs the selection on
each image or frame alone, the sample's kept count shared over them in proportion to their tokens
(largest remainder), visual tokens on no grid forming one more pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import EncoderPruner, Selection, View, kept_counts, split_budget


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of ``k`` rows of ``features`` (``(N, d)``) chosen greedily for max-min cosine distance."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1 - x @ x.T
    n = dist.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf")).min(1).values
    chosen = [int(nearest.argmax())]
    running = dist[chosen[0]].clone()
    running[chosen[0]] = -float("inf")
    for _ in range(k - 1):
        nxt = int(running.argmax())
        chosen.append(nxt)
        running = torch.minimum(running, dist[nxt])
        running[chosen] = -float("inf")
    return torch.tensor(sorted(chosen), device=features.device)


@dataclass
class DivPrune(EncoderPruner):
    """Options: ``keep`` fraction of visual tokens (default 0.5) or ``flops`` target, ``positions``,
    ``scope`` ("all" or "frame")."""

    scope: Literal["all", "frame"] = "all"

    name: ClassVar[str] = "divprune"
    paper: ClassVar[str] = "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for LMMs, CVPR 2025"
    needs: ClassVar[tuple[str, ...]] = ("projected visual tokens",)

    def validate(self) -> None:
        super().validate()
        if self.scope not in ("all", "frame"):
            raise ValueError(f"scope must be 'all' or 'frame', got {self.scope!r}")

    def select(self, view: View) -> Selection:
        keep = ~view.visual
        counts = kept_counts(view, 0, self.keep, self.flops)
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if not cand.numel():
                continue
            pools = [cand] if self.scope == "all" else self._pools(view, b, cand)
            for pool, count in zip(pools, split_budget(counts[b], [p.numel() for p in pools])):
                if count:
                    keep[b, pool[max_min_diverse(view.hidden[b, pool], count)]] = True
        return Selection(keep=keep)

    @staticmethod
    def _pools(view: View, b: int, cand: torch.Tensor) -> list[torch.Tensor]:
        """Sample ``b``'s visual rows per image or frame grid, then those on no grid (if any)."""
        pools = [g.index for g in view.grids[b]]
        gridded = torch.cat(pools) if pools else cand[:0]
        rest = cand[~torch.isin(cand, gridded)]
        return pools + ([rest] if rest.numel() else [])
