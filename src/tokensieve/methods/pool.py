"""Spatial pooling of the visual grid before the LLM: the downsampling baseline.

Each image's projected visual tokens are laid out on their ``rows x cols`` grid and pooled to an
``r x c`` output grid, as LLaVA-OneVision pools video frames after the projector (LLaVA-VL/LLaVA-NeXT
``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.get_2dPool``: ``avg_pool2d(stride)``, or for
``mm_spatial_pool_mode="bilinear"`` ``interpolate(size=(ceil(h / stride), ceil(w / stride)),
mode="bilinear")``). The output grid:

* ``keep``: per image, the budget is ``floor(keep * rows * cols)`` tokens, never more. With the uniform
  scale ``s = sqrt(budget / (rows * cols))``, one side is ``floor`` or ``ceil`` of ``rows * s`` (or
  ``cols * s``) and the other the most the budget then allows; the grid with the most cells wins (ties:
  the aspect ratio nearest the image's, then more rows). ``keep=1`` pools nothing.
* ``flops``: per sample, the most visual tokens whose prefill meets the target (as every method), shared
  over its images in proportion to their tokens, each then gridded as for ``keep``.
* ``stride``: ``ceil(rows / stride) x ceil(cols / stride)`` cells of ``stride x stride`` tokens (the last
  row/column of cells partial where the side is not a multiple), as ``avg_pool2d`` with ``ceil_mode``.
A budget that leaves an image less than one cell raises a ``ValueError``.

Pooling (``mode``): ``"average"`` (default) averages each output cell's bin, adaptive-pooling bins
``[floor(i * rows / r), ceil((i + 1) * rows / r))`` per axis (``adaptive_avg_pool2d``; ``stride``: the
fixed cells above); ``"bilinear"`` resamples the grid with ``interpolate(mode="bilinear",
align_corners=False)`` as the release's bilinear mode. Each output cell's token sits at the original
position of its bin's top-left token (row ``floor(i * rows / r)``, column ``floor(j * cols / c)``;
with ``stride`` and ``"average"``, ``(i * stride, j * stride)``), which the report's ``visual_kept``
names; the others are removed. Positions: ``"auto"`` (default, as the other encoder methods) renumbers the shorter prompt, as
when a pooled projector feeds the LLM fewer tokens, except on M-RoPE models, which keep the cells'
positions; ``"keep"`` / ``"renumber"`` force either. Needs a regular grid per image (LLaVA-1.5,
Qwen2-VL); LLaVA-NeXT's anyres layout is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..flops import solve_kept
from .base import Method, Point, Selection, View, check_budget


def output_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The ``r x c`` grid (``r <= rows``, ``c <= cols``, ``r * c <= budget``) a pooled image gets.

    Raises:
        ValueError: ``budget < 1``.
    """
    if budget < 1:
        raise ValueError(f"a budget of {budget} tokens leaves a {rows}x{cols} grid no cell")
    if budget >= rows * cols:
        return rows, cols
    scale = math.sqrt(budget / (rows * cols))
    candidates = set()
    for r in {math.floor(rows * scale), math.ceil(rows * scale)}:
        r = min(max(r, 1), rows)
        candidates.add((r, min(cols, budget // r)))
    for c in {math.floor(cols * scale), math.ceil(cols * scale)}:
        c = min(max(c, 1), cols)
        candidates.add((min(rows, budget // c), c))
    aspect = math.log(rows / cols)
    return max((rc for rc in candidates if rc[0] >= 1 and rc[1] >= 1),
               key=lambda rc: (rc[0] * rc[1], -abs(math.log(rc[0] / rc[1]) - aspect), rc[0]))


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """``adaptive_avg_pool`` bins of one axis: ``[floor(i * size / out), ceil((i + 1) * size / out))``."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def stride_bins(size: int, stride: int) -> list[tuple[int, int]]:
    """Fixed ``stride`` bins of one axis, the last one partial."""
    return [(i, min(i + stride, size)) for i in range(0, size, stride)]


def average_bins(feats: torch.Tensor, row_bins: list[tuple[int, int]], col_bins: list[tuple[int, int]]) -> torch.Tensor:
    """``feats`` ``(rows, cols, d)`` averaged over each (row bin, column bin) cell: ``(r * c, d)``, row-major."""
    return torch.stack([feats[r0:r1, c0:c1].reshape(-1, feats.shape[-1]).mean(0)
                        for r0, r1 in row_bins for c0, c1 in col_bins])


def top_left(row_bins: list[tuple[int, int]], col_bins: list[tuple[int, int]], cols: int) -> list[int]:
    """Each cell's top-left index in a grid of ``cols`` columns (row-major), cells in row-major order."""
    return [r0 * cols + c0 for r0, _ in row_bins for c0, _ in col_bins]


@dataclass
class Pool(Method):
    """Options: ``stride`` (>= 1; default 2 when no budget is given; 1 pools nothing), or ``keep`` or
    ``flops`` (the output grid meeting it, per image / per sample), ``mode`` ("average" or "bilinear"),
    ``positions`` ("auto", "keep" or "renumber")."""

    stride: int | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"
    keep: float | None = None
    flops: float | None = None
    mode: Literal["average", "bilinear"] = "average"

    name: ClassVar[str] = "pool"
    stages: ClassVar[tuple[str, ...]] = ("encoder",)
    paper: ClassVar[str] = "baseline: spatial average pooling of visual tokens (LLaVA-OneVision get_2dPool)"
    needs: ClassVar[tuple[str, ...]] = ("grid",)

    def validate(self) -> None:
        if sum(x is not None for x in (self.stride, self.keep, self.flops)) > 1:
            raise ValueError("give one of stride, keep or flops")
        check_budget(self.keep, self.flops)
        if self.stride is None and self.keep is None and self.flops is None:
            self.stride = 2
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1 (1 pools nothing), got {self.stride!r}")
        if self.positions not in ("auto", "keep", "renumber"):
            raise ValueError(f"positions must be 'auto', 'keep' or 'renumber', got {self.positions!r}")
        if self.mode not in ("average", "bilinear"):
            raise ValueError(f"mode must be 'average' or 'bilinear', got {self.mode!r}")

    def points(self) -> list[Point]:
        return [Point(before=0, stage="encoder")]

    def positions_mode(self) -> Literal["auto", "keep", "renumber"]:
        return self.positions

    def check_input(self, visual_tokens: list[int]) -> None:
        if self.keep is not None:
            for n in visual_tokens:
                if n and math.floor(self.keep * n + 1e-9) < 1:
                    raise ValueError(f"keep={self.keep} leaves {self.keep * n:.2f} of {n} visual tokens: pool needs at "
                                     "least one cell per image")

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """One square image of ``n_visual`` tokens (``flops``: predicted at stride 2)."""
        side = math.isqrt(n_visual)
        if side * side != n_visual:
            raise ValueError(f"pool needs a square grid; {n_visual} visual tokens is not a square")
        r, c = self._grid(side, side, self._keep_budget(n_visual) if self.keep is not None else None)
        return [r * c] * num_layers, [r * c] * num_layers

    def _keep_budget(self, n: int) -> int:
        return math.floor(self.keep * n + 1e-9)

    def _grid(self, rows: int, cols: int, budget: int | None) -> tuple[int, int]:
        if budget is None:
            s = self.stride or 2
            return -(-rows // s), -(-cols // s)
        try:
            return output_grid(rows, cols, budget)
        except ValueError as err:
            what = f"keep={self.keep}" if self.keep is not None else f"flops={self.flops}"
            raise ValueError(f"{what} is out of reach for pool: {err}") from None

    def _budgets(self, view: View, b: int, grids: list) -> list[int | None]:
        sizes = [g.rows * g.cols for g in grids]
        if self.keep is not None:
            return [self._keep_budget(n) for n in sizes]
        if self.flops is None:
            return [None] * len(grids)
        n_visual = int(view.visual[b].sum())
        text = int(view.query_valid("all")[b].sum()) - n_visual
        total = solve_kept(view.shape, n_visual, text, 0, self.flops)
        exact = [total * n / n_visual for n in sizes]
        out = [int(e) for e in exact]
        for i in sorted(range(len(sizes)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
            out[i] += 1
        return out

    def select(self, view: View) -> Selection:
        keep = ~view.visual
        hidden = None
        for b, grids in enumerate(view.grids):
            if sum(g.index.numel() for g in grids) != int(view.visual[b].sum()):
                raise ValueError("pool needs every image laid out on a regular grid; this model's visual layout is not")
            for grid, budget in zip(grids, self._budgets(view, b, grids)):
                r, c = self._grid(grid.rows, grid.cols, budget)
                if (r, c) == (grid.rows, grid.cols):
                    keep[b, grid.index] = True
                    continue
                if budget is None and self.mode == "average":
                    row_bins, col_bins = stride_bins(grid.rows, self.stride), stride_bins(grid.cols, self.stride)
                else:
                    row_bins, col_bins = adaptive_bins(grid.rows, r), adaptive_bins(grid.cols, c)
                feats = view.hidden[b, grid.index].view(grid.rows, grid.cols, -1)
                if self.mode == "bilinear":
                    image = feats.permute(2, 0, 1)[None].float()
                    pooled = torch.nn.functional.interpolate(image, size=(r, c), mode="bilinear", align_corners=False)
                    pooled = pooled[0].permute(1, 2, 0).to(feats.dtype)
                else:
                    pooled = average_bins(feats, row_bins, col_bins)
                anchors = torch.tensor(top_left(row_bins, col_bins, grid.cols), device=grid.index.device)
                target = grid.index[anchors]
                if hidden is None:
                    hidden = view.hidden.clone()
                hidden[b, target] = pooled.reshape(-1, feats.shape[-1])
                keep[b, target] = True
        return Selection(keep=keep, hidden=hidden)
