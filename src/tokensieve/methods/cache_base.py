"""The budget and the selection shared by score-then-keep-the-top KV-cache methods (H2O, SnapKV, A2SF).

A :class:`CacheScorer` subclass only scores the entries a layer's cache holds; this base turns the
scores into a keep mask, per sample and per layer:

* **budget**: ``budget`` entries per layer (an int), or ``keep``, a fraction of the prompt's real
  cache entries: ``max(1, round(keep * n))`` for a prompt of ``n`` real tokens, fixed at prefill. A
  decode step then keeps the cache at the size the prefill left it, so one entry leaves for each one
  that arrives. A budget of at least the entries held keeps everything.
* **protected entries**: the first ``sinks`` and the last ``window`` real entries (what each method
  calls them) are kept before any score is read; the rest of the budget goes to the highest scores
  among the other real entries (ties: the earlier entry). Where a per-sample budget (``keep``) is too
  small for them, the sinks are cut first to the budget, then the window to what is left.
* padding entries of the input are never kept.

* **per head** (``heads="each"``, the releases' rule): a method scoring ``(B, H_kv, m)`` gets one
  selection per KV head, each of the budget, among the entries that head still attends to; a GQA
  group's query heads are summed into their KV head's score (the current A2SF release's rule; the
  H2O and SnapKV releases need one KV head per query head). The cache holds the union of the heads'
  entries and each head attends only to its own (:class:`~tokensieve.methods.base.CacheView`
  ``heads``), so attention follows the release exactly while the memory saved is the union's: its
  bytes are measured as stored. ``heads="shared"``: the per-head scores summed over the layer's query
  heads and one selection for all heads (tokensieve's earlier rule, kept as an option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CacheView, Method, check_fraction


def keep_budget(view: CacheView, keep: float, real: torch.Tensor | None = None) -> torch.Tensor:
    """``(N,)`` long: the entries a ``keep`` budget lets each of ``real``'s rows (``(N, m)`` bool, by
    default ``view.real``: one row per sample) hold after this pass: ``max(1, round(keep * n))`` of its
    ``n`` real prompt entries at prefill; while decoding, as many as it held before this pass's entries
    arrived (the size the prefill left)."""
    real = view.real if real is None else real
    if view.prefill:
        return (keep * real.sum(1)).round().long().clamp(min=1)
    return real[:, : real.shape[1] - view.new].sum(1)


def head_scores(scores: torch.Tensor, view: CacheView, heads: str) -> torch.Tensor:
    """``(B, H, m)`` scores per query head as a method selects on them: ``(B, H_kv, m)`` with each KV
    head's GQA group summed (``heads="each"``), or ``(B, m)`` summed over every head (``"shared"``)."""
    if heads == "shared":
        return scores.sum(1)
    batch, query_heads, m = scores.shape
    return scores.view(batch, view.kv_heads, query_heads // view.kv_heads, m).sum(2)


@dataclass
class CacheScorer(Method):
    """Options: ``keep`` (fraction of the prompt's real entries kept per layer) or ``budget`` (entries
    kept per layer); with neither, the method's ``default_budget``."""

    keep: float | None = None
    budget: int | None = None

    stages: ClassVar[tuple[str, ...]] = ("cache",)
    visual: ClassVar[bool] = False
    default_budget: ClassVar[tuple[str, float | int]] = ("keep", 0.5)

    def validate(self) -> None:
        if self.keep is not None and self.budget is not None:
            raise ValueError("give keep or budget, not both")
        if self.keep is None and self.budget is None:
            name, value = self.default_budget
            setattr(self, name, value)
        if self.keep is not None:
            check_fraction("keep", self.keep)
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {self.budget!r}")
        if self.budget is not None:
            budget = torch.tensor([self.budget])
            sinks, window = self.protected(budget)
            if int(sinks + window) >= self.budget:
                raise ValueError(f"{self.name}: sinks + window ({int(sinks)} + {int(window)}) must be below "
                                 f"budget ({self.budget}), leaving room for entries kept by score")

    def protected(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sinks, window)``, each ``(B,)`` long: the first and last real entries kept unscored,
        for per-sample budgets ``budget`` ``(B,)`` (before the cut to the budget). Default: none."""
        zero = torch.zeros_like(budget)
        return zero, zero

    def evicts(self, view: CacheView) -> bool:
        """Whether this pass scores and evicts (default: every pass, prefill and decode)."""
        return True

    def score(self, view: CacheView) -> torch.Tensor:
        """``(B, m)`` float score of each entry held, or ``(B, H_kv, m)`` per KV head (higher is kept
        first); may update ``view.memory``."""
        raise NotImplementedError

    def evict(self, view: CacheView) -> torch.Tensor | None:
        if not self.evicts(view) or self.keep == 1:  # keep=1 (kvpress's compression_ratio 0): nothing leaves
            return None
        scores = self.score(view)
        if scores.dim() == 2:
            return self.select(view, scores, self.budgets(view))
        batch, heads, m = scores.shape  # one selection per KV head, among the entries it attends to
        seen = view.real[:, None] & (view.heads if view.heads is not None else view.valid[:, None])
        real = seen.expand(batch, heads, m).reshape(batch * heads, m)
        budget = self.budgets(view, real)
        return self.select(view, scores.reshape(batch * heads, m), budget, real).view(batch, heads, m)

    def budgets(self, view: CacheView, real: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)`` long: the entries each of ``real``'s rows (default: each sample's real entries) may
        hold after this pass."""
        real = view.real if real is None else real
        if self.budget is not None:
            return torch.full((real.shape[0],), self.budget, dtype=torch.long, device=real.device)
        return keep_budget(view, self.keep, real)

    def select(self, view: CacheView, scores: torch.Tensor, budget: torch.Tensor,
               real: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, m)`` bool keep mask over ``real``'s rows (``(N, m)``, default ``view.real``: one per
        sample): every real entry where a row holds at most ``budget`` (``(N,)``), else its sinks, its
        window and the best-scored of the other real entries, ``budget`` in all."""
        real = view.real if real is None else real
        order = real.long().cumsum(1)  # 1-based rank among the sample's real entries
        total = order[:, -1]
        sinks, window = self.protected(budget)
        sinks = torch.minimum(sinks, budget)
        window = torch.minimum(window, budget - sinks)
        guarded = real & ((order <= sinks[:, None]) | (order > (total - window)[:, None]))
        candidate = real & ~guarded
        ranked = scores.float().masked_fill(~candidate, float("-inf"))
        rank = ranked.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        chosen = candidate & (rank < (budget - sinks - window)[:, None])
        return torch.where((total > budget)[:, None], guarded | chosen, real)
