"""A2SF: H2O's accumulated attention with a forgetting factor, so old attention counts less.

Jo & Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
Transformer Decoder", arXiv 2407.20485 (2024); authors' code Dirac-Notation/A2SF.

The score of a cached token after query ``n`` is ``A_n = alpha * A_(n-1) + S_n`` (``S_n`` the
attention query ``n`` gives it), i.e. ``sum_q alpha^(n-q) S_q``: ``alpha = 1`` is H2O's sum,
``alpha = 0`` the last query's attention alone. Two variants, both from the authors' code:

* ``mode="step"`` (default; the paper's eviction at every step): after the prefill and after every
  decode step, keep the first ``sinks`` tokens, the last ``window`` tokens and the best-scored others, the
  cache at ``budget``. This is the release's real-drop cache of March 2025,
  ``utils_real_drop/kv_llama.py`` ``LlamaKVCache.update`` (commit e86c7e4): the prefill's rows weighted
  ``alpha^(N-1-q)``, then ``alpha * score + row`` per decode step; ``streaming_budget`` (sinks) +
  ``select_budget`` + ``recent_budget`` (window) entries kept, per head.
* ``mode="prefill"``: once, after the prefill, from the prefill's rows weighted ``alpha^(N-1-q)``; the
  cache then grows by one entry per decode step. This is the current release,
  ``utils_real_drop/policies/a2sf.py`` ``A2SFPolicy`` with ``attention.py`` ``compressed_attention``
  and ``policies/base.py`` ``_topk_with_recent`` (the top ``total_budget - 16`` of the earlier entries
  plus the last 16, per KV head, scores summed over its query-head group).

Choices made here:

* **per head** (``heads="each"``, default): the releases select per head (``step``) or per KV head
  (``prefill``, a GQA group's query heads summed); here per KV head, the group summed, for both
  modes (per attention head where each has its own KV head). The cache holds the union of the heads'
  entries, each head attending only to its own (``methods/cache_base.py``). ``heads="shared"``: the
  per-head scores summed over all the layer's query heads and one selection serves them all.
* **defaults**: ``budget`` 256, ``window`` 16, ``alpha`` 0.95, no sinks: the current release's README
  example (``total_budget=256``, ``forgetting_factor=0.95``) and its fixed ``recent_budget=16``, for
  both modes (the March 2025 step cache defaults to ``alpha=1``, which is H2O). ``keep`` sets the
  budget from the prompt instead, as the 2025 lm-eval masks set each share as a ratio of the sequence.
* the March 2025 step cache starts accumulating only once the cache first exceeds the budget (a
  prompt shorter than the budget loses the attention it gave before); here every query counts from
  the first, as the paper's formula. A pass of several tokens decays the earlier score once per
  real query, which the formula implies and the release, fed one token per decode step, matches.
* the 2025 lm-eval code (``utils_lm_eval/modify_llama.py`` ``a2s_base_mask``, commit a4360f1) simulates
  the eviction with masks inside one forward, one token evicted per prompt row once the budget is
  reached; with a real cache, as here and in the step release, the prompt is selected at once after
  the prefill and one entry leaves per decode step.
* the releases are batch 1; here each sample has its own scores and budget, and the weights count
  only a sample's real queries (``alpha^(real queries after q)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import CacheView
from .cache_base import CacheScorer, head_scores
from .h2o import accumulate


@dataclass
class A2SF(CacheScorer):
    """Attention received with a forgetting factor, plus sinks and a recent window, evicted every step.

    Options: ``budget`` (entries per layer, default 256) or ``keep``, ``alpha`` (forgetting factor in
    [0, 1], 0.95), ``sinks`` (first entries kept, 0), ``window`` (recent entries kept, 16), ``mode``
    (``"step"``: evict after every pass; ``"prefill"``: once, after the prefill), ``heads``
    (``"each"``: a selection per KV head; ``"shared"``: one for all heads)."""

    alpha: float = 0.95
    sinks: int = 0
    window: int = 16
    mode: Literal["step", "prefill"] = "step"
    heads: Literal["each", "shared"] = "each"

    name: ClassVar[str] = "a2sf"
    paper: ClassVar[str] = ("Jo & Shin, A2SF: Accumulative Attention Scoring with Forgetting Factor for Token "
                            "Pruning in Transformer Decoder, arXiv 2407.20485")
    default_budget: ClassVar[tuple[str, float | int]] = ("budget", 256)

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if self.window < 0:
            raise ValueError(f"window must be an integer >= 0, got {self.window!r}")
        if self.mode not in ("step", "prefill"):
            raise ValueError(f"mode must be 'step' or 'prefill', got {self.mode!r}")
        super().validate()

    def protected(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(budget, self.sinks), torch.full_like(budget, self.window)

    def evicts(self, view: CacheView) -> bool:
        return view.prefill or self.mode == "step"

    def score(self, view: CacheView) -> torch.Tensor:
        """Forgetting-weighted attention received: ``(B, H_kv, m)`` per KV head, or ``(B, m)`` summed
        over the layer's heads (``heads="shared"``); the per-head scores stay in ``view.memory`` only
        where later passes add to them (``"step"``)."""
        scores = head_scores(accumulate(view, self.alpha).transpose(1, 2), view, self.heads)
        if self.mode == "prefill":
            view.memory = None
        return scores
