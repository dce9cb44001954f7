"""FasterVLM: keep the patches the vision tower's [CLS] token attends to most, before the LLM.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (arXiv 2412.01818); authors' code Theia-4869/FasterVLM.

Score of patch j: the attention of the [CLS] query to patch j, averaged over heads, at the vision
encoder layer whose output the LLM receives (LLaVA's ``vision_feature_layer``, -2); keep the top k.
The engine recomputes that one attention row from the layer's q/k projections, so the tower keeps
its attention backend. Positions: ``"auto"`` renumbers the shorter prompt (the released LLaVA code).
Towers without [CLS] (Qwen2-VL, SigLIP) raise a clear error. LLaVA-NeXT's per-crop variant is not
covered here: its anyres layout raises the same error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import Method, Point, Selection, View, check_budget, kept_counts, top_visual


@dataclass
class FasterVLM(Method):
    """Options: ``keep`` fraction of visual tokens (default 0.5) or ``flops`` target, ``positions``."""

    keep: float | None = None
    flops: float | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"

    name: ClassVar[str] = "fastervlm"
    stages: ClassVar[tuple[str, ...]] = ("encoder",)
    paper: ClassVar[str] = "Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning, 2024"
    needs: ClassVar[tuple[str, ...]] = ("cls attention",)

    def bind(self, num_layers: int) -> None:
        check_budget(self.keep, self.flops)

    def points(self) -> list[Point]:
        return [Point(before=0, stage="encoder")]

    def positions_mode(self) -> Literal["keep", "renumber", "auto"]:
        return self.positions

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        kept = max(1, round((0.5 if self.keep is None else self.keep) * n_visual))
        return [kept] * num_layers, [kept] * num_layers

    def select(self, view: View) -> Selection:
        counts = kept_counts(view, 0, self.keep, self.flops)
        return Selection(keep=top_visual(view.vision.cls_attention, view.visual, counts))
