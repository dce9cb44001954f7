"""SnapKV: after the prefill, keep the prompt entries the last prompt tokens attend to, and those tokens.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv 2404.14469); authors' code FasterDecoding/SnapKV.

The release (``snapkv/monkeypatch/snapkv_utils.py``, ``SnapKVCluster.update_kv``, called from
``llama_hijack_4_37.py`` ``llama_flash_attn2_forward`` once per layer, in the prefill only) takes the
attention of the last ``window_size`` prompt queries (the observation window) over the whole prompt,
causal inside the window, fp32 softmax; sums it over the window's queries for each earlier key;
smooths that sum along the keys with a 1-D pooling (``kernel_size``, stride 1, padding
``kernel_size // 2``: ``avgpool`` or ``maxpool``); and keeps, per head, the
``max_capacity_prompt - window_size`` best-pooled earlier entries plus the window. A prompt shorter
than ``max_capacity_prompt`` is kept whole; decode steps only append. Positions are the tokens' own
(the release counts ``kv_seq_len`` over the uncompressed length). Here, the same in every layer after
the prefill pass, with these choices:

* **per head** (``heads="each"``, default): as the release, each head keeps the best of its own
  pooled scores. The release runs on the KV heads repeated to the query heads (one KV head per query
  head); on a GQA model each KV head selects by its group's summed pooled scores. The cache holds the
  union of the heads' entries, each head attending only to its own (``methods/cache_base.py``).
  ``heads="shared"``: the pooled scores summed over the layer's query heads, one selection for all.
  Pooling comes before any sum, as in the release (a max pool does not commute with it).
* **budget**: ``budget`` is ``max_capacity_prompt`` (window included), default 2048, ``window`` is
  ``window_size`` (32), ``kernel_size`` 5 and ``pooling`` ``"avgpool"``: ``init_snapkv``'s defaults.
  The release's LongBench configs (``experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json``)
  use 1024/2048/4096, window 32, kernel 7, ``"maxpool"``. ``keep`` sets the budget from the prompt
  instead (cut to it, the window keeps its most recent entries first).
* the window's own columns count as zeros in the pooling (the release pools the earlier columns
  alone, with zero padding on the right for ``avgpool`` and ``-inf`` for ``maxpool``; the attention
  weights are positive, so a 0 changes no maximum). Batches: each sample's window is its last
  ``window`` real tokens and its scores are its own (the release is batch 1); left padding columns
  hold zero attention, as the pooling's zero padding at the start.
* equal scores (common under ``maxpool``, whose plateaus span a kernel) go to the earlier entry; the
  release's ``torch.topk`` leaves their order unspecified (it differs between CPU and GPU).
* the release casts the softmax to the model's dtype before summing; here the sum stays in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from .base import CacheView
from .cache_base import CacheScorer, head_scores


@dataclass
class SnapKV(CacheScorer):
    """Prompt entries the observation window attends to (pooled), plus the window, once after prefill.

    Options: ``budget`` (entries per layer after the prefill, window included; default 2048) or
    ``keep``, ``window`` (observation window, 32), ``kernel_size`` (odd, 5), ``pooling``
    (``"avgpool"`` or ``"maxpool"``), ``heads`` (``"each"``: a selection per KV head; ``"shared"``)."""

    window: int = 32
    kernel_size: int = 5
    pooling: Literal["avgpool", "maxpool"] = "avgpool"
    heads: Literal["each", "shared"] = "each"

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"
    default_budget: ClassVar[tuple[str, float | int]] = ("budget", 2048)

    def validate(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")
        super().validate()

    def protected(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(budget), torch.full_like(budget, self.window)

    def evicts(self, view: CacheView) -> bool:
        return view.prefill

    def score(self, view: CacheView) -> torch.Tensor:
        """Window attention summed over the window's queries and pooled along the entries per head:
        ``(B, H_kv, m)`` per KV head, or ``(B, m)`` summed over heads (``heads="shared"``); the
        window's own entries score 0."""
        real = view.real
        queries = real[:, real.shape[1] - view.new:]  # (B, n): this pass's rows that are real
        from_end = queries.flip(1).long().cumsum(1).flip(1)  # 1 for the last real row
        observing = queries & (from_end <= self.window)
        first = torch.where(observing, torch.arange(view.new, device=real.device), view.new).amin(1)
        rows = max(1, view.new - int(first.min()))  # the last rows that hold every sample's window
        attention = view.attention(rows) * observing[:, None, view.new - rows:, None]
        summed = attention.sum(2)  # (B, H, m)
        order = real.long().cumsum(1)
        in_window = real & (order > order[:, -1:] - self.window)
        summed = summed.masked_fill(in_window[:, None], 0.0)
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(summed, kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return head_scores(pooled, view, self.heads)
