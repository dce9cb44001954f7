"""TransPrune: rank visual tokens by how much the layers transform them, plus instruction attention.

Li et al., "TransPrune: Token Transition Variation for Efficient Large Vision-Language Model", CVPR 2026
(arXiv 2507.20630); authors' code liaolea/TransPrune.

Token Transition Variation (TTV), for every sublayer (attention and MLP) of the accumulation layers:
``in`` = the normed sublayer input, ``out`` = its output before the residual add,

    TTV = ||out|| / ||in||  x  softmax over tokens of (1 - cos(in, out))

(release: ``LlamaDecoderLayer_TransPrune.compute_transf_weight``), summed over both sublayers and over
the accumulation layers run so far. Instruction-Guided Attention (IGA): the attention of the
instruction tokens (text after the image) to each visual token, mean over heads and instruction tokens,
in the layer the tokens are about to enter. Score = TTV / sum(TTV) + IGA / sum(IGA) over the visual
tokens (``ttv_only`` drops IGA); the top tokens stay.

Stages, as the release reads them (``llava/model/modeling_llama_transprune.py``,
``LlamaModel.transprune_forward`` and ``LlamaModel.transprune_rank_drop``): after decoder layer ``i``,
``rank_layer = i + 1``; for ``rank_layer`` in ``--pruning_layer_list`` (the scripts: ``[7,9,12]``) the
visual tokens entering 0-based layer ``rank_layer`` are pruned, IGA taken from
``self.layers[rank_layer]`` (its input norm and q/k on the hidden states entering it); layer ``i``
contributes TTV when ``i + 1`` is in ``--accmulating_layer_list`` (the scripts: ``[7..12]``, so layers
6..11: the stage at 7 sees layer 6's TTV, the one at 9 layers 6-8, the one at 12 layers 6-11). Stage
``s`` keeps ``int(N * ratio_list[s + 1])`` of the input's ``N`` visual tokens (floor; the scripts:
0.875, 0.625, 0.125).

Here ``layers`` mean the same: ``layers=(7, 9, 12)`` (the default on 32 layers; other depths move them
proportionally) prunes the tokens entering layers 7, 9 and 12, IGA from those layers, TTV accumulated
over layers ``layers[0] - 1 .. layers[-1] - 1``; ``keep`` are the per-stage fractions of the input's
visual tokens (floored, at least one token). A stage at layer 0 (which the release cannot express) sees
no TTV and ranks by IGA alone. ``flops`` scales the kept fractions by one factor (up to keeping every
token at the first stage) to meet a budget. Positions (``positions``): ``"auto"`` (default) as the
release: renumbered after each drop (``position_ids = arange(cur_len)`` in ``transprune_rank_drop``),
the decoded token's position moved down at each stage layer by the tokens it dropped
(``transprune_forward``), except on M-RoPE models (kept there); ``"keep"``: original positions. With
a fitted ``recipe`` (:mod:`tokensieve.methods.scheduled`) its layers are the stage layers (TTV accumulated
over the span they define, as above) and its counts what each stage keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..recipe import Recipe
from .base import Method, Point, Selection, View, top_visual
from .schedule import budget_scales, scaled_layers
from .scheduled import Scheduled

PUBLISHED_LAYERS = (7, 9, 12)
PUBLISHED_KEEP = (0.875, 0.625, 0.125)


@dataclass
class TransPrune(Scheduled, Method):
    """Options: ``layers`` (the layers whose entering tokens are pruned) and ``keep`` (per stage,
    fractions of the input's visual tokens), or ``flops``, or a fitted ``recipe`` in place of the three;
    ``ttv_only``; ``positions``."""

    layers: tuple[int, ...] | None = None
    keep: tuple[float, ...] = PUBLISHED_KEEP
    flops: float | None = None
    ttv_only: bool = False
    positions: Literal["auto", "keep", "renumber"] = "auto"
    recipe: Recipe | dict | str | Path | None = None
    _scales: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "transprune"
    schedule_options: ClassVar[tuple[str, ...]] = ("layers", "keep", "flops")
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Li et al., TransPrune: Token Transition Variation for Efficient LVLM, CVPR 2026"
    needs: ClassVar[tuple[str, ...]] = ("transitions", "attention", "text tokens")
    renumber_at: ClassVar[tuple[str, ...]] = ("prefill",)

    def validate(self) -> None:
        self.load_recipe()

    def bind(self, num_layers: int) -> None:
        self.num_layers = num_layers
        if self.recipe is not None:
            self.layers = self.recipe_layers(num_layers)  # each >= 1, so TTV has a layer before it
            return
        if self.layers is None:
            self.layers = scaled_layers(PUBLISHED_LAYERS, 32, num_layers)
        self.layers = tuple(int(x) for x in self.layers)
        self.keep = tuple(float(x) for x in self.keep)
        if len(self.layers) != len(self.keep):
            raise ValueError(f"layers {self.layers} and keep {self.keep} must have one entry per stage")
        if list(self.layers) != sorted(set(self.layers)) or not all(0 <= x < num_layers for x in self.layers):
            raise ValueError(f"stage layers must increase inside 0..{num_layers - 1}, got {self.layers}")
        if self.ttv_only and self.layers[0] == 0:
            raise ValueError("ttv_only needs stage layers >= 1: a stage at layer 0 has no layer before it to measure TTV on")
        if any(not 0 < k <= 1 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"keep fractions must be in (0, 1] and non-increasing, got {self.keep}")
        if self.flops is not None and not 0 < self.flops < 1:
            raise ValueError(f"flops must be in (0, 1), got {self.flops!r}")

    def transition_layers(self) -> list[int]:
        """The release's accumulating span read through ``rank_layer = i + 1``: layers
        ``layers[0] - 1 .. layers[-1] - 1`` (6..11 for stages at 7, 9, 12)."""
        return list(range(max(0, self.layers[0] - 1), self.layers[-1]))

    def positions_mode(self) -> Literal["auto", "keep", "renumber"]:
        return self.positions

    def points(self) -> list[Point]:
        return [Point(before=layer, attention_layer=layer) for layer in self.layers]

    def _kept(self, stage: int, scale: float, n_visual: int) -> int:
        """``int(N * ratio)`` as the release computes it from its ratio list, at least 1 (the fraction is
        taken to 12 significant digits, so a ``flops`` scale of 1 / keep[0] keeps every token)."""
        return max(1, int(n_visual * float(f"{self.keep[stage] * scale:.12g}")))

    def _visual(self, n_visual: int, scale: float) -> list[int]:
        counts, n = [], n_visual
        for layer in range(self.num_layers):
            if layer in self.layers:
                n = min(n, self._kept(self.layers.index(layer), scale, n_visual))
            counts.append(n)
        return counts

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        if self.recipe is not None:
            return self.recipe_schedule(num_layers, n_visual)
        counts = self._visual(n_visual, 1.0)
        return counts, list(counts)

    def select(self, view: View) -> Selection:
        stage = self.layers.index(view.point.before)
        if stage == 0:
            self._scales = {}
        if view.transitions is None:  # stages only at layer 0: no layer has run, no TTV
            score = torch.zeros(view.visual.shape, device=view.visual.device)
        else:
            score = view.transitions.masked_fill(~view.visual, 0.0)
            score = score / score.sum(1, keepdim=True).clamp(min=1e-12)
        if not self.ttv_only:
            text = view.query_valid("instruction").float()
            probs = view.attention("instruction").mean(1)  # (B, q, n): the instruction tokens' rows
            iga = (probs * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
            iga = iga.masked_fill(~view.visual, 0.0)
            score = score + iga / iga.sum(1, keepdim=True).clamp(min=1e-12)
        if self.recipe is not None:
            return Selection(keep=top_visual(score, view.visual, self.recipe_kept(view)))
        scales = budget_scales(view, self.flops, self._scales, self._visual, f"transprune with stages at {self.layers}",
                               1 / self.keep[0])
        counts = [self._kept(stage, c, n_in) for c, n_in in zip(scales, view.visual_input)]
        return Selection(keep=top_visual(score, view.visual, counts))
