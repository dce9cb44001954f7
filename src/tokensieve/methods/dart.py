"""DART: keep the visual tokens that duplicate a few pivot tokens least, at an early LLM layer.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", EMNLP 2025 (arXiv 2502.11494); authors' code ZichenWen1/DART
(``llava/model/language_model/modeling_llama_self.py``, ``DART.get_retained_image_token``).

At the input of layer K (default 2), needing no attention weights:
    1. pivots: the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens (after the last
       image) with the largest L1 norm of their post-rotary keys at layer K-1;
    2. hidden states of layer K's input, passed through the model's final norm, compared by cosine;
    3. for each pivot in turn, the candidate visual tokens (image pivots excluded) least similar to it
       join the kept set and leave the candidate pool;
    4. kept = image pivots + the tokens chosen in 3; text tokens are never dropped; kept tokens keep
       their original positions (the release's ``position_ids = keep_indexs``).

Counts, ``split``:
    ``"release"`` (default, the authors' code): every pivot takes ``floor(B / P)`` tokens, with ``P``
        the pivots and ``B = keep * N`` (the release's ``N * (1 - reduction_ratio)``; its scripts pass
        ``max_num_trunction`` 128 of 576, i.e. ``keep=128/576``), so ``image_pivots + P * floor(B / P)``
        visual tokens stay: 132 for the scripts' 128 with 4 + 4 pivots, 76 of 144 at ``keep=0.5``.
        With ``flops`` the sample's affordable count k is rounded down to that shape
        (``image_pivots + P * floor((k - image_pivots) / P)``, at least the image pivots, at most k).
        ``keep=1`` keeps every token.
    ``"exact"`` (tokensieve's): exactly ``k = round(keep * N)`` stay (or the flops count): the
        ``k - image_pivots`` slots are split as evenly as possible over the pivots, the first visited
        ones taking one more.
The pivots are visited in the release's order: Python's iteration order of the set of their sequence
positions (``list(set(image_indices + query_indices))``, image pivots listed first, each group by
decreasing key norm); the order matters because each pivot's choice leaves the pool. Positions are
counted from the sample's first token (padding before it left out), which for a LLaVA prompt are the
release's sequence indices, so a sample visits its pivots in a padded batch as it does alone.
With a fitted ``recipe`` (:mod:`tokensieve.methods.scheduled`) the rule runs before each of its layers
and keeps exactly the recipe's count there (as ``split="exact"``).
Choice made here: fewer text tokens than ``text_pivots`` use them all (the release's ``topk`` fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..recipe import Recipe
from .base import OneLayerPruner, Selection, View, budget_keep, kept_counts


def release_order(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """The pivots' positions in the order the release visits them: ``list(set(image + text))``."""
    return list(set(image_positions + text_positions))


@dataclass
class DART(OneLayerPruner):
    """Options: ``layer`` K (>= 1), ``keep`` (default 0.5) or ``flops``, ``image_pivots``, ``text_pivots``,
    ``split`` ("release": per-pivot ``floor(keep * N / P)``; "exact": exactly ``round(keep * N)`` kept);
    or a fitted ``recipe`` in place of ``layer``, ``keep`` and ``flops``."""

    layer: int = 2
    keep: float | None = None
    flops: float | None = None
    image_pivots: int = 4
    text_pivots: int = 4
    split: Literal["release", "exact"] = "release"
    recipe: Recipe | dict | str | Path | None = None

    name: ClassVar[str] = "dart"
    schedule_options: ClassVar[tuple[str, ...]] = ("layer", "keep", "flops")
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Wen et al., Stop Looking for Important Tokens in MLLMs: Duplication Matters More, EMNLP 2025"
    needs: ClassVar[tuple[str, ...]] = ("keys", "hidden states", "text tokens")

    def validate(self) -> None:
        self.load_recipe()
        if self.recipe is None:
            self.keep = budget_keep(self.keep, self.flops)
        if self.image_pivots < 0 or self.text_pivots < 0 or self.image_pivots + self.text_pivots == 0:
            raise ValueError("image_pivots and text_pivots must be >= 0 and not both 0")
        if self.split not in ("release", "exact"):
            raise ValueError(f"split must be 'release' or 'exact', got {self.split!r}")

    def release_count(self, n_visual: int, n_pivots: int | None = None, affordable: int | None = None) -> int:
        """Visual tokens the release's rule keeps of ``n_visual`` with ``n_pivots`` pivots (default: all
        ``image_pivots + text_pivots``), for ``keep`` or, given, an ``affordable`` count."""
        n_pivots = max(1, self.image_pivots + self.text_pivots if n_pivots is None else n_pivots)
        image = min(self.image_pivots, n_visual)
        if affordable is not None:
            image = min(image, affordable)
            per = max(0, affordable - image) // n_pivots
        elif self.keep >= 1:
            return n_visual
        else:
            per = int((self.keep * n_visual) // n_pivots)
        return min(n_visual, image + n_pivots * per)

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        if self.split == "exact" or self.flops is not None or self.recipe is not None:
            return super().visual_schedule(num_layers, n_visual)
        kept = self.release_count(n_visual)
        n_in = [n_visual] * self.layer + [kept] * (num_layers - self.layer)
        return n_in, list(n_in)

    def select(self, view: View) -> Selection:
        norms = view.keys().float().abs().sum(-1)  # (B, n)
        text = view.query_valid("text")
        real = view.query_valid("all")
        normed = torch.nn.functional.normalize(view.final_norm(view.hidden).float(), dim=-1)
        exact = self.split == "exact" or self.recipe is not None
        counts = self.recipe_kept(view) if self.recipe else kept_counts(view, self.layer, self.keep, self.flops)
        keep = ~view.visual
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if cand.numel() == 0:
                continue
            txt = text[b].nonzero().squeeze(1)
            n_txt = min(self.text_pivots, txt.numel())
            if not exact:
                n_piv = min(self.image_pivots, cand.numel()) + n_txt
                k = self.release_count(cand.numel(), n_piv, counts[b] if self.flops is not None else None)
                if k >= cand.numel():
                    keep[b, cand] = True
                    continue
            else:
                k = min(counts[b], cand.numel())
            img_piv = cand[norms[b, cand].topk(min(self.image_pivots, k)).indices]
            txt_piv = txt[norms[b, txt].topk(n_txt).indices]
            # the release's indices: positions in the sample's own sequence (padding before it not counted)
            index = view.positions[b] - view.positions[b][real[b]].min()
            row_of = {int(index[r]): int(r) for r in torch.cat([img_piv, txt_piv]).tolist()}
            order = release_order([int(index[r]) for r in img_piv.tolist()], [int(index[r]) for r in txt_piv.tolist()])
            pivots = [row_of[p] for p in order]
            pool = cand[~torch.isin(cand, img_piv)]
            slots = k - img_piv.numel()
            chosen = [img_piv]
            for i, pivot in enumerate(pivots):
                if not exact:
                    take = slots // len(pivots)
                else:
                    take = slots // len(pivots) + (1 if i < slots % len(pivots) else 0)
                if take == 0 or pool.numel() == 0:
                    continue
                similarity = normed[b, pool] @ normed[b, pivot]
                least = similarity.topk(min(take, pool.numel()), largest=False).indices
                chosen.append(pool[least])
                pool = pool[~torch.isin(pool, pool[least])]
            keep[b, torch.cat(chosen)] = True
        return Selection(keep=keep)
