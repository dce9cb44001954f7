"""VFlowOpt: prune and recycle visual tokens by an importance map from the vision tower's information flow.

Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided
Optimization", ICCV 2025 (arXiv 2508.05211); authors' code sihany077/VFlowOpt.

Importance map, per image, at the vision layer whose output the LLM receives (A: attention averaged
over heads, [CLS] included):
    received_j = mean_i A[i, j];  global tokens G = {j : received_j > t * mean(received)}
    relevance_j = mean_{g in G} A[g, j]          (how much the global tokens attend to patch j)
    entropy_j  = Shannon entropy of a 256-bin grey-level histogram of patch j's pixels
    map_j      = relevance_j + alpha * softmax(entropy)_j
Before the LLM (prune + recycle): with P = N - round(vit_keep * N) tokens to remove, the P + N/m^2
lowest-map tokens are marked; they are grouped by m x m cells of the patch grid; in each group the
highest-map token takes the map-weighted average of the group's (projected) tokens and stays, the
rest leave. Inside the LLM, at ``layers`` (published 9 and 18 of 28, moved proportionally), visual
tokens are ranked by the same map and ``stage_keep`` fractions of the input's visual tokens stay;
positions: ``positions="auto"`` (default) feeds the LLM the shorter prompt numbered ``0..L-1`` after the
vision stage, as the release builds it, and the LLM stages then keep those positions (the release's
``forward_illava`` gathers ``position_ids`` with its masks), except on M-RoPE models, whose positions are
kept; ``"keep"``: the input's positions throughout. With ``flops`` the last stage's fraction is solved to meet the budget (the
release solves it from a layer-averaged budget); where the budget is above what the schedule costs
even with its last stage pruning nothing more, every fraction (``vit_keep`` and ``stage_keep``) is first
scaled up by one common factor, capped at 1 (our choice: the release has no such case). The flow-guided search of (vit_keep, first stage
keep, t, m, alpha) is ``tokensieve calibrate --method vflowopt`` (:mod:`tokensieve.vflowopt_search`).
The recycling cell size ``m`` is real, as in the release (``llava_qwen_training_free.py``: a token at
grid point (r, c) falls in cell (floor(r / m), floor(c / m)); ``int(N / m^2)`` tokens are marked on top
of the P removed); ``t`` >= 0 and ``alpha`` in [-1, 1] are the release's ranges.
Defaults (tokensieve's, not a released configuration): vit_keep 0.5, stage_keep (0.25, 0.125), t 1,
m 2, alpha 0. The released optimised configs (``llava_onevision_training_free.py``: t 28.7 / 34.8 /
39.3, m 11.8 / 15.6 / 17.4, alpha 0 for the 50% / 25% / 10% budgets) were tuned on LLaVA-OneVision's
27 x 27 SigLIP grids; on a 12 x 12 or 24 x 24 grid an m of 12-17 makes one or four cells, so they do
not transfer as defaults: ``tokensieve calibrate --method vflowopt`` searches them per model; grey levels are the channel mean of the tower's input pixels,
binned over each image's own range; with nothing to remove (``vit_keep`` 1) no token is marked, so
the vision stage keeps every token unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from .base import Method, Point, Selection, View, top_visual
from .schedule import scaled_layers, solve_scale


def patch_entropy(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N,)`` entropy (bits) of each ``patch x patch`` cell's 256-bin grey histogram of ``pixels`` (``(C, H, W)``)."""
    grey = pixels.float().mean(0)
    lo, hi = grey.min(), grey.max()
    levels = ((grey - lo) / (hi - lo).clamp(min=1e-6) * 255).round().long().clamp(0, 255)
    h, w = levels.shape[0] // patch, levels.shape[1] // patch
    cells = levels[: h * patch, : w * patch].reshape(h, patch, w, patch).permute(0, 2, 1, 3).reshape(h * w, -1)
    hist = torch.zeros(h * w, 256).scatter_add_(1, cells.cpu(), torch.ones_like(cells, dtype=torch.float).cpu())
    p = hist / hist.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(1)


def importance_map(attention: torch.Tensor, entropy: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
    """``(N,)`` map of the patches from the head-averaged ``(1+N, 1+N)`` attention and patch entropy."""
    received = attention.mean(0)
    glob = received > t * received.mean()
    if not bool(glob.any()):
        glob = received == received.max()
    relevance = attention[glob].mean(0)[1:]
    return relevance + alpha * torch.softmax(entropy.to(relevance), 0)


@dataclass
class VFlowOpt(Method):
    """Options: ``vit_keep``, ``stage_keep`` (per LLM stage), ``layers``, ``t``, ``m``, ``alpha``, ``flops``,
    ``positions``."""

    vit_keep: float = 0.5
    stage_keep: tuple[float, ...] = (0.25, 0.125)
    layers: tuple[int, ...] | None = None
    t: float = 1.0
    m: float = 2.0
    alpha: float = 0.0
    flops: float | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"
    _maps: dict[int, dict[int, float]] = field(default_factory=dict, repr=False)
    _last: dict[int, float] = field(default_factory=dict, repr=False)
    _scale: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "vflowopt"
    stages: ClassVar[tuple[str, ...]] = ("encoder", "prefill")
    paper: ClassVar[str] = "Yang et al., VFlowOpt: Visual Information Flow-Guided Optimization, ICCV 2025"
    needs: ClassVar[tuple[str, ...]] = ("vision attention",)

    def bind(self, num_layers: int) -> None:
        self.num_layers = num_layers
        if self.layers is None:
            self.layers = scaled_layers((9, 18), 28, num_layers)[: len(self.stage_keep)]
        self.layers = tuple(int(x) for x in self.layers)
        self.stage_keep = tuple(float(x) for x in self.stage_keep)
        if len(self.layers) != len(self.stage_keep):
            raise ValueError(f"layers {self.layers} and stage_keep {self.stage_keep} need one entry per stage")
        if list(self.layers) != sorted(set(self.layers)) or not all(1 <= x < num_layers for x in self.layers):
            raise ValueError(f"stage layers must increase inside 1..{num_layers - 1}, got {self.layers}")
        fractions = (self.vit_keep, *self.stage_keep)
        if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions, reverse=True):
            raise ValueError(f"vit_keep and stage_keep must be in (0, 1] and non-increasing, got {fractions}")
        if self.m < 1 or self.t < 0 or not -1 <= self.alpha <= 1:
            raise ValueError(f"need m >= 1, t >= 0 and alpha in [-1, 1] (the release's ranges), got m={self.m}, "
                             f"t={self.t}, alpha={self.alpha}")
        if self.flops is not None and not 0 < self.flops < 1:
            raise ValueError(f"flops must be in (0, 1), got {self.flops!r}")

    def positions_mode(self) -> Literal["auto", "keep", "renumber"]:
        return self.positions

    def points(self) -> list[Point]:
        return [Point(before=0, stage="encoder")] + [Point(before=layer) for layer in self.layers]

    def _visual(self, n_visual: int, last: float, after_encoder: int | None = None, scale: float = 1.0) -> list[int]:
        """Visual tokens entering each layer with the last stage at fraction ``last`` and every other
        fraction multiplied by ``scale`` (capped at 1)."""
        keeps = (*(min(1.0, k * scale) for k in self.stage_keep[:-1]), last)
        vit = min(1.0, self.vit_keep * scale)
        counts, n = [], max(1, round(vit * n_visual)) if after_encoder is None else after_encoder
        for layer in range(self.num_layers):
            if layer in self.layers:
                n = min(n, max(1, round(keeps[self.layers.index(layer)] * n_visual)))
            counts.append(n)
        return counts

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = self._visual(n_visual, self.stage_keep[-1])
        return counts, list(counts)

    def select(self, view: View) -> Selection:
        if view.point.stage == "encoder":
            return self._recycle(view)
        stage = self.layers.index(view.point.before)
        scores = torch.zeros(view.visual.shape)
        for b, maps in self._maps.items():
            for col, pos in enumerate(view.positions[b].tolist()):
                scores[b, col] = maps.get(pos, 0.0)
        fractions = [self._last.get(b, self.stage_keep[-1]) if stage == len(self.layers) - 1
                     else min(1.0, self.stage_keep[stage] * self._scale.get(b, 1.0)) for b in range(view.visual.shape[0])]
        counts = [max(1, round(f * n)) for f, n in zip(fractions, view.visual_input)]
        return Selection(keep=top_visual(scores.to(view.hidden.device), view.visual, counts))

    def _recycle(self, view: View) -> Selection:
        raw = view.vision.raw
        keep = ~view.visual
        hidden = view.hidden.clone()
        self._maps, self._last, self._scale = {}, {}, {}
        for b, images in enumerate(view.vision.images):
            self._maps[b] = {}
            if self.flops is not None and images:
                self._scale[b] = self._solve_scale(view, b)
            vit_keep = min(1.0, self.vit_keep * self._scale.get(b, 1.0))
            for cols, image in images:
                n = cols.numel()
                side = math.isqrt(n)
                entropy = patch_entropy(raw.pixels[image], raw.patch) if self.alpha != 0 else torch.zeros(n)
                score = importance_map(raw.attention[image], entropy, self.t, self.alpha).cpu()
                for col, value in zip(cols.tolist(), score.tolist()):
                    self._maps[b][int(view.positions[b, col])] = value
                removed = n - max(1, round(vit_keep * n))
                marked = score.argsort()[: min(n, removed + int(n / (self.m * self.m))) if removed else 0]
                kept = torch.ones(n, dtype=torch.bool)
                kept[marked] = False
                rows, cols_in_row = torch.arange(n) // side, torch.arange(n) % side
                cells = (rows / self.m).floor().long() * side + (cols_in_row / self.m).floor().long()
                for cell in cells[marked].unique().tolist():
                    group = marked[cells[marked] == cell]
                    weights = score[group] / score[group].sum().clamp(min=1e-12)
                    best = group[score[group].argmax()]
                    hidden[b, cols[best]] = (weights.to(hidden)[:, None] * view.hidden[b, cols[group]]).sum(0)
                    kept[best] = True
                keep[b, cols[kept.to(cols.device)]] = True
            if self.flops is not None and images:
                self._last[b] = self._solve_last(view, b, int((keep[b] & view.visual[b]).sum()))
        return Selection(keep=keep, hidden=hidden)

    def _ceiling(self, scale: float) -> float:
        """The last stage's largest fraction: the one before it (scaled by ``scale``, capped at 1)."""
        return min(1.0, (self.stage_keep[-2] if len(self.stage_keep) > 1 else self.vit_keep) * scale)

    def _solve_scale(self, view: View, b: int) -> float:
        """1, or the common factor on every fraction that sample ``b`` needs to come up to ``flops``
        when the last stage alone cannot (the schedule costs less than the budget at its ceiling)."""
        n_in = view.visual_input[b]
        text = int(view.query_valid("all")[b].sum()) - n_in
        scale = solve_scale(view.shape, n_in, text, lambda c: self._visual(n_in, self._ceiling(c), None, c),
                            self.flops, f"vflowopt with stages at {self.layers}", most=1.0 / min(self.vit_keep, *self.stage_keep))
        return max(1.0, scale)

    def _solve_last(self, view: View, b: int, after_encoder: int) -> float:
        """The last stage's fraction for sample ``b`` that meets ``flops``, given the tokens the vision
        stage actually left (recycling may keep a few more than ``vit_keep``)."""
        n_in = view.visual_input[b]
        text = int(view.query_valid("all")[b].sum()) - n_in
        scale = self._scale.get(b, 1.0)
        last = self.stage_keep[-1]
        factor = solve_scale(view.shape, n_in, text, lambda c: self._visual(n_in, c * last, after_encoder, scale),
                             self.flops, f"vflowopt with stages at {self.layers}", most=self._ceiling(scale) / last)
        return factor * last
