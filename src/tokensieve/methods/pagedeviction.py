"""PagedEviction: token eviction to the budget at the prefill, then whole-block eviction in a paged cache.

Chitty-Venkata et al., "PagedEviction: Structured Block-wise KV Cache Pruning for Efficient Large
Language Model Inference", arXiv 2509.04377 (2025), Findings of EACL 2026; authors' prototype
krishnateja95/PagedEviction (``modeling_llama.py``, a Hugging Face Llama whose
``LlamaSdpaAttention`` evicts inside the attention).

The paper scores each token without attention weights, ``S_i = ||V_i||_2 / ||K_i||_2`` (a high score
is kept), and a block by the mean of its tokens' scores. At the prefill the lowest-scored tokens are
evicted down to the cache budget ``C`` before the rest fill blocks of ``B`` tokens; in the decode
phase, whenever the newest block becomes full, one whole block, the lowest-scored, is evicted, so the
memory freed is a whole block and no block is ever partly emptied. Here, in every layer, with the KV
cache stored in blocks (:class:`~tokensieve.paged_cache.PagedCache`, which the engine gives a method
that declares ``"paged cache"`` in its ``needs``); the prefill eviction is a
:class:`~tokensieve.methods.cache_base.CacheScorer` top-``C`` selection, the decode eviction frees
one block back to the layer's pool without copying any entry.

Token scores (``score``), each computed per KV head and reduced over a layer's KV heads as the
prototype's ``get_token_score`` averages its norms over heads (one selection serves a layer's heads):

* ``"paper"`` (default): the paper's ``||v|| / ||k||``, on the head-averaged norms. A vLLM port that
  circulates computes ``||k|| / ||v||`` under the paper's name (its ``value_l2_div_key_l2`` passes the
  key block to the value norm and the value block to the key norm); this is the paper's orientation.
* ``"inv_key"``: ``1 / (||k|| + 1e-6)``, the prototype's ``Inverse_Key_L2_Norm_*``;
* ``"value"``: ``||v||``, its ``Value_L2norm_*``;
* ``"key_plus_value"``: ``||k|| + ||v||``, its ``Value_L2norm_Key_L2_norm_*``.

The variants are ranked as the prototype's ``forward_local_eviction`` ranks them (high is kept at the
prefill, the lowest-scored block is evicted); its ``forward_global_eviction`` keeps the lowest token
scores at the prefill and evicts the highest-scored page, the opposite orientation.

Details the paper leaves open, chosen here:

* **protected blocks**: the first block and the newest (last) block of a sequence are never evicted,
  as both decode paths of the prototype exempt its first and last pages (the paper text available
  states only that one block is evicted when the recent one fills). The prefill selection protects
  nothing: the top ``C`` scores stay, wherever they are (the prototype also pins its first and last
  prompt pages there).
* **when**: a block is evicted only if the sequence then holds more than its budget ``C`` (so a
  budget that holds everything is the plain model; the prototype's local path also evicts below it);
  a pass that fills several blocks evicts up to one block per block filled, no more than needed to
  get back to ``C``. One token per step, after a prefill of ``C`` entries with ``r = C mod B``, a
  sequence ends every step holding at most ``C - r + B - 1`` entries (``C - r + B`` while the step
  that fills a block attends, ``C - r`` after its eviction): ``floor(C / B) + 1`` blocks at most.
  ``budget`` must therefore be at least two blocks (the first and the newest are kept).
* **budget**: ``budget`` entries per layer (default 1024) or ``keep``, a fraction of each sample's
  prompt (at least two blocks; ``keep=1``: nothing evicted), fixed at the prefill for the decode
  steps; ``block_size`` 16, vLLM's default.
* scores in fp32, ``1e-6`` added to the key norm wherever it divides; equal scores: the earlier
  token stays, the earlier block goes. Batches: each sample its own scores, budget and block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import CacheView
from .cache_base import CacheScorer

EPS = 1e-6
Score = Literal["paper", "inv_key", "value", "key_plus_value"]  # another value: TypeError at construction


def token_scores(keys: torch.Tensor, values: torch.Tensor, score: Score) -> torch.Tensor:
    """``(B, m)`` float32 score of each entry (higher is kept), from ``keys``/``values`` ``(B, H_kv, m, D)``:
    each head's L2 norms averaged over the KV heads, then combined as ``score`` says."""
    k = keys.float().norm(dim=-1).mean(1)
    v = values.float().norm(dim=-1).mean(1)
    if score == "paper":
        return v / (k + EPS)
    if score == "inv_key":
        return 1.0 / (k + EPS)
    if score == "value":
        return v
    return k + v


@dataclass
class PagedEviction(CacheScorer):
    """Top-``C`` tokens by ``||v|| / ||k||`` at the prefill, then a whole block evicted per block filled over ``C``.

    Options: ``budget`` (entries per layer, default 1024, at least two blocks) or ``keep`` (fraction
    of the prompt), ``block_size`` (entries per block, 16), ``score`` (``"paper"``, ``"inv_key"``,
    ``"value"``, ``"key_plus_value"``; the option shadows :meth:`CacheScorer.score`, which this class
    does not use)."""

    block_size: int = 16
    score: Score = "paper"

    name: ClassVar[str] = "pagedeviction"
    paper: ClassVar[str] = ("Chitty-Venkata et al., PagedEviction: Structured Block-wise KV Cache Pruning for "
                            "Efficient Large Language Model Inference, arXiv 2509.04377")
    needs: ClassVar[tuple[str, ...]] = ("paged cache",)
    default_budget: ClassVar[tuple[str, float | int]] = ("budget", 1024)

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        super().validate()
        if self.budget is not None and self.budget < 2 * self.block_size:
            raise ValueError(f"budget ({self.budget}) must be at least two blocks ({2 * self.block_size}): the first "
                             "and the newest block are never evicted")

    def bind(self, num_layers: int) -> None:
        self._budgets: list[torch.Tensor | None] = [None] * num_layers

    def evict(self, view: CacheView) -> torch.Tensor | None:
        if self.keep == 1:  # kvpress's compression_ratio 0: nothing leaves
            return None
        if view.prefill:
            budget = self.budgets(view).clamp(min=2 * self.block_size)  # never below two blocks, with keep too
            self._budgets[view.layer] = budget
            return self.select(view, token_scores(view.keys(), view.values(), self.score), budget)
        return self._evict_blocks(view, self._budgets[view.layer])

    def _evict_blocks(self, view: CacheView, budget: torch.Tensor) -> torch.Tensor | None:
        """``(B, m)`` keep mask without the blocks a decode pass evicts, or None when none is.

        A sample's entries are its valid columns in order, packed in blocks as the paged cache stores
        them: its ``j``-th entry is in its block ``j // block_size``."""
        size, valid = self.block_size, view.valid
        held = valid.sum(1)
        filled = held // size - (held - view.new) // size
        over = (view.real.sum(1) - budget).clamp(min=0)
        blocks = -(-held // size)
        count = torch.minimum(torch.minimum(filled, -(-over // size)), (blocks - 2).clamp(min=0))
        if not bool(count.any()):
            return None
        scores = token_scores(view.keys(), view.values(), self.score) * valid
        block = torch.where(valid, (valid.long().cumsum(1) - 1) // size, 0)
        width = int(blocks.max())
        sums = scores.new_zeros(valid.shape[0], width).scatter_add(1, block, scores)
        sizes = scores.new_zeros(valid.shape[0], width).scatter_add(1, block, valid.float())
        index = torch.arange(width, device=valid.device)
        candidate = (index >= 1) & (index < (blocks - 1)[:, None])
        ranked = (sums / sizes.clamp(min=1)).masked_fill(~candidate, float("inf"))
        order = ranked.argsort(dim=1, stable=True).argsort(dim=1)
        evicted = candidate & (order < count[:, None])
        return valid & ~evicted.gather(1, block)
