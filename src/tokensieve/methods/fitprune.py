"""FitPrune: a per-layer visual-token pruning recipe fitted to a FLOPs budget from attention statistics.

Ye, Wu, Lin, Zhou, "Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal Large
Language Models", AAAI 2025 (arXiv 2409.10197); authors' code ywh187/FitPrune.

Notation, at decoder layer l, with A the softmax attention maximised over heads (``(n, n)``), V the
visual tokens alive, T the text tokens after the (last) image:

    cross_j = sum_{t in T} A[t, j]          (text -> visual attention received by visual token j)
    self_j  = sum_{i in V} A[i, j] / |V|    (visual -> visual attention received, averaged)

Inference (:class:`FitPrune`), prefill only, static during decoding: at each layer l with
``recipe[l] > 0``, computed from layer l's *own* attention, remove the ``recipe[l]`` visual tokens with
the lowest score; they still serve as keys and values in layer l (and stay in its cache) and leave
after its attention, skipping its o-projection and MLP; survivors keep their original positions.

    score="product" (the release's, default):  cross_j * self_j
    score="fit": the order in which the fitting rule removes tokens: a token's score is
                 max(rank of cross_j, rank of self_j) in ascending order, so removing the k lowest
                 is the intersection rule of the fit; ties broken by the product score.

Fitting (:class:`FitPruneSearch`, driven by :mod:`tokensieve.calibration`): with the unpruned masses
``M_cross[l] = sum_{j in V} cross_j / |T|`` and ``M_self[l] = sum_{j in V} self_j`` of each calibration
sample, one pass for a tolerance alpha goes layer by layer: if the FLOPs already spent plus the
remaining layers at the current length meet the budget (mean over the calibration batch), nothing more
is pruned; otherwise each sample removes the intersection of the longest ascending prefix of cross
(resp. self) whose removal keeps at least (1 - alpha) of M_cross[l] (resp. M_self[l]); the recipe is
the floored per-layer mean of the removals.

The search over alpha (:func:`tokensieve.calibration.calibrate`), ``search="release"`` (default): the
release's bisection (``LLaVA_1.5/llava/eval/statistical_analysis.py``, ``statistical_analysis``): alpha
in [0, 1], halved while ``max - min > 0.01``; a probe whose pass fired its stop rule (``fit_model``'s
``flops_reach``) lowers ``max``, any other raises ``min``; the recipe is the last probe's scheme
(``scheme // N``), whether or not that probe reached the budget (the recipe records whether it did
and what it achieves). The last probe lies within 0.01 of the smallest alpha that reaches the budget,
so the recipe prunes a little at almost every layer. ``search="feasible"`` (tokensieve's alternative): probes are judged by the recipe's own FLOPs
ratio, the best recipe at or under the budget is kept, and a repair step postpones removals until it
is within 0.01 of the budget: front-loaded recipes that always meet the budget.
FLOPs count all tokens by default; the release counts visual tokens only (``visual_only=True``); the
recipe records its convention. The stop rule is judged over all calibration samples together, as the
release judges it (``fit_model`` goes layer by layer over every sample, its FLOPs sums run over all of
them before each check): with several calibration batches (``calibrate --batch-size`` below
``--samples``) each batch's pass prunes at every layer and records its per-sample FLOPs forecasts; the
first layer where the forecasts summed over all samples meet the budget ends every sample's removals,
and the recipe sums the removals before it, so the recipe does not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..flops import Shape, layer_macs
from ..recipe import Recipe
from .base import Method, Point, Selection, View


def attention_scores(view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cross``, ``self`` (``(B, n)``, zero off the visual rows) and ``text`` count ``(B,)`` at the view's layer."""
    probs = view.attention("all").max(1).values  # (B, n, n), head max
    text_rows = view.query_valid("text").to(probs.dtype)  # (B, n)
    vis = view.visual.to(probs.dtype)
    n_vis = vis.sum(1, keepdim=True).clamp(min=1)
    cross = (probs * text_rows[..., None]).sum(1) * vis
    self_ = (probs * vis[..., None]).sum(1) / n_vis * vis
    return cross, self_, text_rows.sum(1)


def _ascending_rank(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(values.numel(), device=values.device)
    return rank


@dataclass
class FitPrune(Method):
    """Options: ``recipe`` (a :class:`Recipe`, its dict form or a JSON path), ``score`` ("product" or "fit"),
    ``fractions`` (scale the recipe to inputs with other visual-token counts), ``flops`` (the budget the
    recipe must have been fitted for; fitting itself is ``tokensieve calibrate``)."""

    recipe: Recipe | dict | str | Path | None = None
    score: Literal["product", "fit"] = "product"
    fractions: bool = False
    flops: float | None = None

    name: ClassVar[str] = "fitprune"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Ye et al., Fit and Prune: Fast and Training-free Visual Token Pruning for MLLMs, AAAI 2025"
    needs: ClassVar[tuple[str, ...]] = ("attention", "text tokens")

    def validate(self) -> None:
        if self.recipe is None:
            raise ValueError("fitprune needs a recipe: recipe=Recipe(...) or a JSON path from `tokensieve calibrate`")
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        elif not isinstance(self.recipe, Recipe):
            self.recipe = Recipe.load(self.recipe)
        if self.recipe.method != "fitprune":
            raise ValueError(f"the recipe was fitted for {self.recipe.method} (its removals happen before each layer, "
                             f"FitPrune's inside it): use --method {self.recipe.method}")
        if self.flops is not None and self.recipe.budget is not None and abs(self.flops - self.recipe.budget) > 1e-9:
            raise ValueError(f"the recipe was fitted for flops={self.recipe.budget}, not {self.flops}; calibrate one for {self.flops}")
        if self.score not in ("product", "fit"):
            raise ValueError(f"score must be 'product' or 'fit', got {self.score!r}")

    def bind(self, num_layers: int) -> None:
        self.recipe.check_model(num_layers)

    def check_input(self, visual_tokens: list[int]) -> None:
        for n in visual_tokens:
            if n != self.recipe.visual_tokens and not self.fractions:
                raise ValueError(f"recipe fitted for {self.recipe.visual_tokens} visual tokens per input; this input has {n}. "
                                 "Use fractions=True to scale it (variable-resolution models) or fit a recipe for this model")

    def points(self) -> list[Point]:
        return [Point(before=l, attention_layer=l, inside=True) for l, n in self.recipe.removed.items() if n > 0]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = self.recipe.counts_for(n_visual)
        n_in, n_out, n = [], [], n_visual
        for layer in range(num_layers):
            n_in.append(n)
            n = max(1, n - counts.get(layer, 0))
            n_out.append(n)
        return n_in, n_out

    def select(self, view: View) -> Selection:
        cross, self_, _ = attention_scores(view)
        keep = view.valid.clone()
        layer = view.point.before
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            k = min(self.recipe.counts_for(view.visual_input[b]).get(layer, 0), cand.numel() - 1)
            if k <= 0:
                continue
            product = cross[b, cand] * self_[b, cand]
            if self.score == "product":
                order = product.argsort()
            else:
                rank = torch.maximum(_ascending_rank(cross[b, cand]), _ascending_rank(self_[b, cand])).double()
                order = (rank + product.double() / (product.double().max() + 1) * 0.5).argsort()
            keep[b, cand[order[:k]]] = False
        return Selection(keep=keep)


@dataclass
class FitPruneSearch(Method):
    """One fitting pass for tolerance ``alpha`` (``None``: measure the unpruned masses and prune nothing).

    Fills ``masses`` (per layer, ``(B, 2)`` cross and self mass) when ``alpha`` is None, else
    ``removed`` (per layer, per-sample counts) using ``masses`` from the measuring pass, ``forecast``
    (per layer, per sample: the FLOPs spent before the layer plus the rest of the model at the length
    entering it), ``full`` (per sample, unpruned FLOPs) and ``reached``: whether the pass's stop rule
    fired (the budget was met before the last layer: the release's ``flops_reach``). With ``stop=False``
    the pass never stops (it prunes at every layer) and leaves the rule to the caller, who judges it
    over several passes' ``forecast`` and ``full`` together (:func:`tokensieve.calibration.calibrate`);
    a sample's removals before the layer where the rule fires do not depend on the other samples.
    """

    num_layers: int = 0
    alpha: float | None = None
    budget: float = 0.5
    shape: Shape | None = None
    visual_only: bool = False
    stop: bool = True
    masses: dict[int, torch.Tensor] = field(default_factory=dict)
    removed: dict[int, list[int]] = field(default_factory=dict)
    spent: list[float] = field(default_factory=list)
    full: list[float] = field(default_factory=list)
    forecast: dict[int, list[float]] = field(default_factory=dict)
    reached: bool = False

    name: ClassVar[str] = "fitprune-search"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = FitPrune.paper

    def points(self) -> list[Point]:
        return [Point(before=l, attention_layer=l, inside=True) for l in range(self.num_layers)]

    def select(self, view: View) -> Selection:
        layer = view.point.before
        cross, self_, n_text = attention_scores(view)
        keep = view.valid.clone()
        if self.alpha is None:
            self.masses[layer] = torch.stack([cross.sum(1) / n_text.clamp(min=1), self_.sum(1)], 1)
            return Selection(keep=keep)
        real = view.query_valid("all").sum(1).to(torch.float64)
        n_vis = view.visual.sum(1).to(torch.float64)
        counted = n_vis if self.visual_only else real
        if layer == 0:
            self.spent = [0.0] * keep.shape[0]
            self.full = (layer_macs(self.shape, counted) * self.num_layers).tolist()
        spent = torch.tensor(self.spent, dtype=torch.float64)
        rest = layer_macs(self.shape, counted) * (self.num_layers - layer)
        self.forecast[layer] = (spent + rest).tolist()
        if self.stop:
            self.reached = self.reached or bool((spent + rest).sum() <= self.budget * sum(self.full))
        removed = [0] * keep.shape[0]
        if not self.reached:
            base = self.masses[layer]
            for b in range(keep.shape[0]):
                cand = view.visual[b].nonzero().squeeze(1)
                if cand.numel() <= 1:
                    continue
                gone_c = _tolerated_prefix(cross[b, cand] / max(1.0, float(n_text[b])), float(base[b, 0]), self.alpha)
                gone_s = _tolerated_prefix(self_[b, cand], float(base[b, 1]), self.alpha)
                gone = gone_c & gone_s
                if int(gone.sum()) >= cand.numel():
                    gone[self_[b, cand].argmax()] = False
                keep[b, cand[gone]] = False
                removed[b] = int(gone.sum())
        self.removed[layer] = removed
        out = counted - torch.tensor(removed, dtype=torch.float64)
        self.spent = (spent + layer_macs(self.shape, counted, out)).tolist()
        return Selection(keep=keep)


def _tolerated_prefix(scores: torch.Tensor, mass: float, alpha: float) -> torch.Tensor:
    """Bool mask of the longest ascending prefix of ``scores`` whose removal leaves >= (1 - alpha) * mass."""
    order = scores.argsort()
    removed_mass = scores[order].cumsum(0)
    remaining = scores.sum() - removed_mass
    count = int((remaining >= (1 - alpha) * mass - 1e-12).sum())
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[:count]] = True
    return mask
