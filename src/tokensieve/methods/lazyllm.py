"""LazyLLM: at every generation step, compute only the tokens the last token attends to, layer by layer.

Fu, Cho, Merth, Mehta, Rastegari, Najibi, "LazyLLM: Dynamic Token Pruning for Efficient Long Context
LLM Inference", arXiv 2407.14057 (Apple, 2024). Apple released no code (none found in the public
index searched for this work); this follows the paper's Section 3 (progressive token pruning, the Aux
Cache). The one public re-implementation read, Adam-Mazur/Lazy-Llama (``decoder_layer.py``,
``context.py``; its Qwen3 port aayc123/lazyllm-qwen), was read for comparison, not followed: it prunes
at every layer by a per-layer rate and averages the scores over the batch.

Algorithm, for every forward pass (the prefill, then each decode step), with pruning layers
``l_1 < l_2 < ...`` and fractions ``k_1, k_2, ...``:
    1. layers ``0 .. l_1 - 1`` see every earlier token;
    2. after layer ``l_j - 1``, score each token ``i`` the layer's attention saw by the attention the
       pass's last token ``N`` pays it there, averaged over heads: ``s_i = (1/H) sum_h A_(h, N, i)``
       (the paper's confidence score, "the attention map of the previous layer");
    3. keep the top ``k_j`` of them (the paper's top-k percentile; the last token is never pruned);
       layers ``l_j ..`` see only those: a token pruned at ``l_j`` is absent from every later layer of
       the pass (the kept sets are nested);
    4. the next pass chooses again from all tokens, so a token pruned earlier can come back.
A token's KV at layer ``l`` is computed once, the first time a pass needs it there; where it was never
computed, the engine runs the token from the hidden state it had where it was last pruned (the paper's
Aux Cache), through the layers it misses only (``tokensieve.engine.revival``). Positions are never
renumbered: every token keeps its rotary position.

Choices made where the paper is silent:
    * the pruning layers and fractions: the paper describes a progressive schedule that keeps more
      tokens in early layers and fewer towards the end (Figure 4, Section 5.4) but states no single
      default; here ``layers`` a quarter, half and three quarters of the depth (8, 16, 24 of Llama 2
      7B's 32) and ``keep`` 0.7 at each, so layers compute 100%, 70%, 49% and 34% of the prompt: 63% of
      the prompt's token-layers, near the ~64% of prompt computation that summaries of the paper report;
    * ``keep`` is a fraction of the tokens the scoring layer saw (the pass's last token counted):
      ``max(1, round(k * n))`` stay; equal scores go to the earlier position;
    * in a batch every sample chooses on its own scores; padding is never chosen;
    * a revived token's query at a layer sees the tokens that layer computes in the present pass (its
      own and earlier positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, RevivalView, check_fraction


@dataclass
class LazyLLM(Method):
    """Options: ``layers`` (the pruning layers: tokens pruned there are absent from that layer on),
    ``keep`` (fraction of the scoring layer's tokens kept at each pruning layer: one number for all, or
    one per layer)."""

    layers: tuple[int, ...] | None = None
    keep: float | tuple[float, ...] = 0.7
    _keep: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "lazyllm"
    stages: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    paper: ClassVar[str] = "Fu et al., LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference, 2024"
    needs: ClassVar[tuple[str, ...]] = ("aux cache",)
    visual: ClassVar[bool] = False

    def validate(self) -> None:
        fractions = self.keep if isinstance(self.keep, (tuple, list)) else (self.keep,)
        if not fractions:
            raise ValueError("keep must be a fraction or a non-empty tuple of fractions")
        for value in fractions:
            check_fraction("keep", value)

    def bind(self, num_layers: int) -> None:
        if self.layers is None:
            self.layers = tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)}))
        self.layers = tuple(self.layers)
        if not self.layers or any(not isinstance(x, int) or not 1 <= x < num_layers for x in self.layers):
            raise ValueError(f"lazyllm pruning layers must be in 1..{num_layers - 1} for this "
                             f"{num_layers}-layer model, got {self.layers}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"lazyllm pruning layers must increase, got {self.layers}")
        keep = tuple(self.keep) if isinstance(self.keep, (tuple, list)) else (self.keep,)
        keep = keep * len(self.layers) if len(keep) == 1 else keep  # one fraction (``--keep 0.5``) serves every layer
        if len(keep) != len(self.layers):
            raise ValueError(f"keep has {len(keep)} fractions for {len(self.layers)} pruning layers {self.layers}")
        self._keep = dict(zip(self.layers, keep))

    def pruning_layers(self) -> dict[int, float]:
        """``{layer: fraction kept}``: after ``layer - 1`` runs, the tokens of ``layer`` on are chosen."""
        return dict(self._keep)

    def choose(self, view: RevivalView) -> torch.Tensor:
        """Top ``k`` of the candidates by the last token's attention, averaged over heads: ``(B, m)`` bool."""
        scores = view.attention().mean(1)  # (B, m): s_i = (1/H) sum_h A_(h, N, i)
        fraction = self._keep[view.layer + 1]
        count = (fraction * view.candidate.sum(1)).round().long().clamp(min=1)  # (B,)
        scores = scores.masked_fill(~view.candidate, float("-inf")).masked_fill(view.last, float("inf"))
        by_position = view.positions.argsort(dim=1, stable=True)  # ties: the earlier position first
        order = scores.gather(1, by_position).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, by_position.gather(1, order),
                                                torch.arange(order.shape[1], device=order.device).expand_as(order))
        return view.candidate & (rank < count[:, None])

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """Tokens each layer computes at prefill (every token counted: LazyLLM prunes text too)."""
        counts, n = [], n_visual
        for layer in range(num_layers):
            if layer in self._keep:
                n = max(1, round(self._keep[layer] * n))
            counts.append(n)
        return counts, list(counts)
