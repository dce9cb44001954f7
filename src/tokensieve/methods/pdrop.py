"""PyramidDrop: drop visual tokens in stages, ranked by the last instruction token's attention.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025 (arXiv 2410.17247); authors' code Cooperx521/PyramidDrop.

The decoder is split into stages at ``layers`` (default: a quarter, half and three quarters of the
depth, the paper's 8/16/24 of 32 layers). At the end of each stage the visual tokens are ranked by the
attention the last token of the prompt gives them (mean over heads) in the stage's last layer, and
the top ``ratio`` (lambda, default 0.5) of the remaining visual tokens go on to the next stage. With
``flops`` lambda is solved per sample so that the whole schedule meets the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..flops import Shape, prefill_flops
from .base import Method, Point, Selection, View, check_budget, check_fraction, top_visual


def _schedule(n_visual: int, layers: list[int], ratio: float, num_layers: int) -> list[int]:
    counts, n = [], n_visual
    for layer in range(num_layers):
        if layer in layers:
            n = max(1, round(n * ratio))
        counts.append(n)
    return counts


@dataclass
class PDrop(Method):
    """Options: ``layers`` (stage boundaries), ``ratio`` lambda kept per stage, or ``flops`` target."""

    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    flops: float | None = None
    _lambdas: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "pdrop"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Xing et al., PyramidDrop: Pyramid Visual Redundancy Reduction, CVPR 2025"
    needs: ClassVar[tuple[str, ...]] = ("attention",)

    def bind(self, num_layers: int) -> None:
        if self.layers is None:
            self.layers = tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)}))
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers or any(not 1 <= x < num_layers for x in self.layers):
            raise ValueError(f"pdrop stage layers must be in 1..{num_layers - 1}, got {self.layers}")

    def validate(self) -> None:
        check_fraction("ratio", self.ratio)
        check_budget(None, self.flops)

    def points(self) -> list[Point]:
        return [Point(before=layer, attention_layer=layer - 1) for layer in self.layers]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = _schedule(n_visual, list(self.layers), self.ratio, num_layers)
        return counts, list(counts)

    def _lambda(self, shape: Shape, n_visual: int, n_text: int) -> float:
        full = prefill_flops(shape, [n_visual + n_text] * shape.layers)

        def ratio(lam: float) -> float:
            counts = _schedule(n_visual, list(self.layers), lam, shape.layers)
            return prefill_flops(shape, [c + n_text for c in counts]) / full

        if ratio(1e-9) > self.flops:
            raise ValueError(f"flops={self.flops} is out of reach with stages at {self.layers}: at most {ratio(1e-9):.3f}")
        lo, hi = 1e-9, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ratio(mid) <= self.flops else (lo, mid)
        return lo

    def select(self, view: View) -> Selection:
        probs = view.attention("last").mean(1)[:, 0]  # (B, n)
        counts = view.visual.sum(1).tolist()
        if view.point.before == self.layers[0]:
            self._lambdas = {}
        ratios = []
        for b, n in enumerate(counts):
            if self.flops is None:
                ratios.append(self.ratio)
                continue
            if b not in self._lambdas:
                text = int(view.query_valid("all")[b].sum()) - view.visual_input[b]
                self._lambdas[b] = self._lambda(view.shape, view.visual_input[b], text)
            ratios.append(self._lambdas[b])
        return Selection(keep=top_visual(probs, view.visual, [max(1, round(n * r)) for n, r in zip(counts, ratios)]))
