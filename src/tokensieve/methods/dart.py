"""DART: keep the visual tokens that duplicate a few pivot tokens least, at an early LLM layer.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", EMNLP 2025 (arXiv 2502.11494); authors' code ZichenWen1/DART.

At the input of layer K (default 2), needing no attention weights:
    1. pivots: the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens (after the last
       image) with the largest L1 norm of their post-rotary keys at layer K-1;
    2. hidden states of layer K's input, passed through the model's final norm, compared by cosine;
    3. for each pivot in turn, the candidate visual tokens least similar to it join the kept set and
       leave the candidate pool;
    4. kept = image pivots + the tokens chosen in 3; text tokens are never dropped.
Choice made here: the released code gives each pivot ``budget // n_pivots`` tokens (its totals
overshoot the budget by the image pivots); here the k - image_pivots slots are split as evenly as
possible over the pivots (the first ones get one more), so exactly k visual tokens stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import OneLayerPruner, Selection, View, budget_keep, kept_counts


@dataclass
class DART(OneLayerPruner):
    """Options: ``layer`` K (>= 1), ``keep`` (default 0.5) or ``flops``, ``image_pivots``, ``text_pivots``."""

    layer: int = 2
    keep: float | None = None
    flops: float | None = None
    image_pivots: int = 4
    text_pivots: int = 4

    name: ClassVar[str] = "dart"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Wen et al., Stop Looking for Important Tokens in MLLMs: Duplication Matters More, EMNLP 2025"
    needs: ClassVar[tuple[str, ...]] = ("keys", "hidden states", "text tokens")

    def validate(self) -> None:
        self.keep = budget_keep(self.keep, self.flops)
        if self.image_pivots < 0 or self.text_pivots < 0 or self.image_pivots + self.text_pivots == 0:
            raise ValueError("image_pivots and text_pivots must be >= 0 and not both 0")

    def select(self, view: View) -> Selection:
        norms = view.keys().float().abs().sum(-1)  # (B, n)
        text = view.query_valid("text")
        normed = torch.nn.functional.normalize(view.final_norm(view.hidden).float(), dim=-1)
        counts = kept_counts(view, self.layer, self.keep, self.flops)
        keep = ~view.visual
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if cand.numel() == 0:
                continue
            k = min(counts[b], cand.numel())
            img_piv = cand[norms[b, cand].topk(min(self.image_pivots, k)).indices]
            txt = text[b].nonzero().squeeze(1)
            txt_piv = txt[norms[b, txt].topk(min(self.text_pivots, txt.numel())).indices]
            pivots = torch.cat([img_piv, txt_piv])
            pool = cand[~torch.isin(cand, img_piv)]
            slots = k - img_piv.numel()
            chosen = [img_piv]
            for i, pivot in enumerate(pivots.tolist()):
                take = slots // len(pivots) + (1 if i < slots % len(pivots) else 0)
                if take == 0 or pool.numel() == 0:
                    continue
                similarity = normed[b, pool] @ normed[b, pivot]
                least = similarity.topk(min(take, pool.numel()), largest=False).indices
                chosen.append(pool[least])
                pool = pool[~torch.isin(pool, pool[least])]
            keep[b, torch.cat(chosen)] = True
        return Selection(keep=keep)
