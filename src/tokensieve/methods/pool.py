"""Spatial average pooling of the visual grid before the LLM: the downsampling baseline.

Each image's visual tokens are laid out on their grid and averaged over ``stride x stride`` cells
(the last row/column of cells may be partial when the grid side is not a multiple of the stride).
Each cell becomes one token whose position is the cell's top-left token; with the default
``positions="keep"`` it keeps that token's rotary position, with ``"renumber"`` the prompt is simply
shorter (as when a pooled projector feeds the LLM fewer tokens). Needs a regular grid per image
(LLaVA-1.5, Qwen2-VL); LLaVA-NeXT's anyres layout is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..flops import prefill_flops
from .base import Method, Point, Selection, View, check_budget


@dataclass
class Pool(Method):
    """Options: ``stride`` (>= 1; default 2; 1 pools nothing), or ``keep`` (stride = round(1 / sqrt(keep)),
    at least 2 below keep=1) or ``flops`` (the smallest stride meeting it, per sample), ``positions``
    ("keep" or "renumber")."""

    stride: int | None = None
    positions: Literal["keep", "renumber"] = "keep"
    keep: float | None = None
    flops: float | None = None

    name: ClassVar[str] = "pool"
    stages: ClassVar[tuple[str, ...]] = ("encoder",)
    paper: ClassVar[str] = "baseline: spatial average pooling of visual tokens"
    needs: ClassVar[tuple[str, ...]] = ("grid",)

    def validate(self) -> None:
        if sum(x is not None for x in (self.stride, self.keep, self.flops)) > 1:
            raise ValueError("give one of stride, keep or flops")
        check_budget(self.keep, self.flops)
        if self.keep is not None:
            self.stride = 1 if self.keep == 1 else max(2, round(1 / math.sqrt(self.keep)))
        if self.stride is None and self.flops is None:
            self.stride = 2
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1 (1 pools nothing), got {self.stride!r}")
        if self.positions not in ("keep", "renumber"):
            raise ValueError(f"positions must be 'keep' or 'renumber', got {self.positions!r}")

    def points(self) -> list[Point]:
        return [Point(before=0, stage="encoder")]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        side = math.isqrt(n_visual)
        if side * side != n_visual:
            raise ValueError(f"pool needs a square grid; {n_visual} visual tokens is not a square")
        kept = math.ceil(side / (self.stride or 2)) ** 2
        return [kept] * num_layers, [kept] * num_layers

    def positions_mode(self) -> Literal["keep", "renumber"]:
        return self.positions

    def select(self, view: View) -> Selection:
        keep = ~view.visual
        hidden = view.hidden.clone()
        for b, grids in enumerate(view.grids):
            s = self.stride or self._stride_for(view, b, grids)
            covered = 0
            for grid in grids:
                covered += grid.index.numel()
                feats = view.hidden[b, grid.index].view(grid.rows, grid.cols, -1)
                for r in range(0, grid.rows, s):
                    for c in range(0, grid.cols, s):
                        cell = feats[r : r + s, c : c + s].reshape(-1, feats.shape[-1])
                        target = grid.index[r * grid.cols + c]
                        hidden[b, target] = cell.mean(0)
                        keep[b, target] = True
            if covered != int(view.visual[b].sum()):
                raise ValueError("pool needs every image laid out on a regular grid; this model's visual layout is not")
        return Selection(keep=keep, hidden=hidden)

    def _stride_for(self, view: View, b: int, grids: list) -> int:
        """Smallest stride whose pooled token count meets ``flops`` for sample ``b``."""
        n_visual = int(view.visual[b].sum())
        text = int(view.query_valid("all")[b].sum()) - n_visual
        full = prefill_flops(view.shape, [n_visual + text] * view.shape.layers)
        largest = max((max(g.rows, g.cols) for g in grids), default=1)
        for s in range(2, largest + 1):
            kept = sum(math.ceil(g.rows / s) * math.ceil(g.cols / s) for g in grids)
            if prefill_flops(view.shape, [kept + text] * view.shape.layers) / full <= self.flops:
                return s
        raise ValueError(f"flops={self.flops} is out of reach for pool: one token per image still costs more")
