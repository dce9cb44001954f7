"""H2O: keep the heavy hitters (most attention received so far) and a recent window in every KV cache.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv 2306.14048); authors' code FMInference/H2O.

The release's real-drop cache for Llama (``h2o_hf/utils_real_drop/modify_llama.py``,
``H2OKVCache_LayerWise.__call__`` and ``_update_hh_score``, called by ``H2OLlamaAttention.forward``
after every forward of every layer) keeps, per attention head, a score for each cached token: the sum
of the attention it received from every query so far (the prefill's rows, then one row per decode
step). Once the cache is longer than ``hh_size + recent_size`` it keeps the ``recent_size`` newest
tokens and the ``hh_size`` best-scored among the others; decoding one token at a time, that is the
paper's greedy eviction of one token per step (Algorithm 1). Here, the same after every pass of every
layer, with these choices:

* **per head** (``heads="each"``, default): as the release, each head keeps its own heavy hitters
  and recent window from its own scores (kept in ``view.memory`` as the release keeps ``hh_score``).
  The release needs as many KV heads as query heads (its per-head mask indexes the KV cache); on a
  GQA model each KV head selects by its query-head group's summed score. The cache holds the union
  of the heads' entries, each head attending only to its own (``methods/cache_base.py``).
  ``heads="shared"``: the scores summed over the layer's query heads and one selection for all heads.
* **budget**: ``budget`` is the release's ``hh_size + recent_size``; ``keep`` (default 0.2) sets it
  from the prompt, as the paper's experiments and ``utils_hh`` set heavy and recent budgets as
  ratios of the prompt (``--heavy_ratio 0.1 --recent_ratio 0.1``). ``window`` is ``recent_size``; by
  default half the budget (the paper's equal heavy and recent shares), per sample with ``keep``:
  ``budget // 2``, where the release takes ``int(0.1 * n)`` for each share.
* **positions** (``positions``): ``"keep"`` (default), each token keeps its rotary position, as in
  ``H2OLlamaAttention`` and the ``utils_hh`` masks the paper's results come from; ``"shift"``,
  positions within the cache, as ``H2OLlamaAttention_streaming`` (``run_streaming.py``) rotates the
  query at the cache's length and the cached keys at their index; only with ``heads="shared"`` (a
  key's index in tokensieve's cache is shared by the heads, so it is not its index among one head's
  entries).
* the release sums the batch into one score (batch 1); here every sample has its own scores and
  budget, padding entries are neither scored (their attention is 0) nor kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import CacheView
from .cache_base import CacheScorer, head_scores


def accumulate(view: CacheView, alpha: float = 1.0) -> torch.Tensor:
    """Add this pass's attention to each entry's per-head score in ``view.memory``, the earlier score
    decayed by ``alpha`` once per real query of the pass, each query weighted ``alpha`` to the number of
    real queries after it (``A_n = alpha * A_(n-1) + S_n`` query by query; ``alpha=1``: H2O's sum).

    Returns:
        ``(B, m, H)`` float32: the scores, also stored in ``view.memory``.
    """
    queries = view.real[:, view.real.shape[1] - view.new:]  # (B, q): which of this pass's rows are real
    later = queries.flip(1).long().cumsum(1).flip(1) - queries.long()
    weights = (alpha ** later.float()) * queries.float()
    received = view.received(weights).transpose(1, 2)  # (B, m, H)
    if view.memory is None:
        view.memory = received
    else:
        decay = alpha ** queries.sum(1).float()
        view.memory = view.memory * decay[:, None, None] + received
    return view.memory


@dataclass
class H2O(CacheScorer):
    """Heavy hitters by attention received so far, plus a recent window, evicted after every pass.

    Options: ``keep`` (default 0.2) or ``budget`` (entries per layer), ``window`` (recent entries
    kept; default half the budget), ``positions`` (``"keep"``: original rotary positions; ``"shift"``:
    positions within the cache), ``heads`` (``"each"``: a selection per KV head; ``"shared"``: one)."""

    window: int | None = None
    positions: Literal["keep", "shift"] = "keep"
    heads: Literal["each", "shared"] = "each"

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = ("Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of "
                            "Large Language Models, NeurIPS 2023")
    default_budget: ClassVar[tuple[str, float | int]] = ("keep", 0.2)

    def validate(self) -> None:
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be an integer >= 0, got {self.window!r}")
        if self.positions not in ("keep", "shift"):
            raise ValueError(f"positions must be 'keep' or 'shift', got {self.positions!r}")
        if self.positions == "shift" and self.heads == "each":
            raise ValueError("positions='shift' rotates each key at its index in the cache, which the heads share; "
                             "with per-head eviction (heads='each') use positions='keep', or heads='shared'")
        super().validate()

    def protected(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = budget // 2 if self.window is None else torch.full_like(budget, self.window)
        return torch.zeros_like(budget), window

    def cache_positions(self) -> Literal["keep", "shift", "auto"]:
        return self.positions

    def score(self, view: CacheView) -> torch.Tensor:
        """Attention received so far, summed over queries: ``(B, H_kv, m)`` per KV head, or ``(B, m)``
        summed over the layer's heads (``heads="shared"``)."""
        return head_scores(accumulate(view).transpose(1, 2), view, self.heads)
