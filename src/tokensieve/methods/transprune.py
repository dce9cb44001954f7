"""TransPrune: rank visual tokens by how much the layers transform them, plus instruction attention.

Li et al., "TransPrune: Token Transition Variation for Efficient Large Vision-Language Model", CVPR 2026
(arXiv 2507.20630); authors' code liaolea/TransPrune.

Token Transition Variation (TTV), for every sublayer (attention and MLP) of the accumulation layers:
``in`` = the normed sublayer input, ``out`` = its output before the residual add,

    TTV = ||out|| / ||in||  x  softmax over tokens of (1 - cos(in, out))

summed over both sublayers and over the layers from the first stage layer up to the current one.
Instruction-Guided Attention (IGA): at a pruning point, the attention of the instruction tokens
(text after the image) to each visual token in the next layer, mean over heads and instruction tokens.
Score = TTV / sum(TTV) + IGA / sum(IGA) over the visual tokens (``ttv_only`` drops IGA); the top
tokens stay. Stages (published, 32 layers): after layers 7, 9, 12, keeping 87.5%, 62.5%, 12.5% of the
input's visual tokens; other depths move the layers proportionally; ``flops`` scales the kept
fractions by one factor (up to keeping every token at the first stage) to meet a budget. Choices made here: stage layers are 0-indexed and a stage's tokens leave
at the boundary after that layer; kept tokens keep their original positions (the release renumbers
them; the engine never renumbers inside the LLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, Point, Selection, View, top_visual
from .schedule import scaled_layers, solve_scale

PUBLISHED_LAYERS = (7, 9, 12)
PUBLISHED_KEEP = (0.875, 0.625, 0.125)


@dataclass
class TransPrune(Method):
    """Options: ``layers`` and ``keep`` (per stage, fractions of the input's visual tokens), or
    ``flops``; ``ttv_only``."""

    layers: tuple[int, ...] | None = None
    keep: tuple[float, ...] = PUBLISHED_KEEP
    flops: float | None = None
    ttv_only: bool = False
    _scales: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "transprune"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Li et al., TransPrune: Token Transition Variation for Efficient LVLM, CVPR 2026"
    needs: ClassVar[tuple[str, ...]] = ("transitions", "attention", "text tokens")

    def bind(self, num_layers: int) -> None:
        self.num_layers = num_layers
        if self.layers is None:
            self.layers = scaled_layers(PUBLISHED_LAYERS, 32, num_layers)
        self.layers = tuple(int(x) for x in self.layers)
        self.keep = tuple(float(x) for x in self.keep)
        if len(self.layers) != len(self.keep):
            raise ValueError(f"layers {self.layers} and keep {self.keep} must have one entry per stage")
        if list(self.layers) != sorted(set(self.layers)) or not all(0 <= x < num_layers - 1 for x in self.layers):
            raise ValueError(f"stage layers must increase inside 0..{num_layers - 2}, got {self.layers}")
        if any(not 0 < k <= 1 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"keep fractions must be in (0, 1] and non-increasing, got {self.keep}")
        if self.flops is not None and not 0 < self.flops < 1:
            raise ValueError(f"flops must be in (0, 1), got {self.flops!r}")

    def transition_layers(self) -> list[int]:
        return list(range(self.layers[0], self.layers[-1] + 1))

    def points(self) -> list[Point]:
        return [Point(before=layer + 1, attention_layer=layer + 1) for layer in self.layers]

    def _visual(self, n_visual: int, scale: float) -> list[int]:
        counts, n = [], n_visual
        for layer in range(self.num_layers):
            if layer - 1 in self.layers:
                n = min(n, max(1, round(self.keep[self.layers.index(layer - 1)] * scale * n_visual)))
            counts.append(n)
        return counts

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = self._visual(n_visual, 1.0)
        return counts, list(counts)

    def select(self, view: View) -> Selection:
        stage = self.layers.index(view.point.before - 1)
        if stage == 0:
            self._scales = {}
        score = view.transitions.masked_fill(~view.visual, 0.0)
        score = score / score.sum(1, keepdim=True).clamp(min=1e-12)
        if not self.ttv_only:
            text = view.query_valid("text").float()
            probs = view.attention("all").mean(1)  # (B, n, n)
            iga = (probs * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
            iga = iga.masked_fill(~view.visual, 0.0)
            score = score + iga / iga.sum(1, keepdim=True).clamp(min=1e-12)
        counts = []
        for b, n_in in enumerate(view.visual_input):
            scale = 1.0
            if self.flops is not None:
                if b not in self._scales:
                    text_tokens = int(view.query_valid("all")[b].sum()) - n_in
                    self._scales[b] = solve_scale(view.shape, n_in, text_tokens, lambda c: self._visual(n_in, c),
                                                  self.flops, f"transprune with stages after {self.layers}",
                                                  most=1 / self.keep[0])
                scale = self._scales[b]
            counts.append(max(1, round(self.keep[stage] * scale * n_in)))
        return Selection(keep=top_visual(score, view.visual, counts))
