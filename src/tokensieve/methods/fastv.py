"""FastV: drop the visual tokens that receive the least attention, once, after an early layer.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models", ECCV 2024 (arXiv 2403.06764); authors' code pkunlp-icler/FastV.

Algorithm (prefill, static: decoding does not re-rank):
    1. run layers 0..K-1 on the full sequence;
    2. score each visual token j by the attention it receives at layer K-1, averaged over heads:
       ``variant="paper"``: also averaged over all query tokens (the paper's "average attention");
       ``variant="code"``: the last query token's row only (what the released code computes);
    3. keep the top ``keep = 1 - R`` fraction of visual tokens; layers K.. see only those (their
       original rotary positions are kept); text tokens are never dropped.

Default ``variant="code"``: it is what published comparisons that run the authors' code measure, and
it needs one attention row instead of n. With a fitted ``recipe`` (:mod:`tokensieve.methods.scheduled`)
the same score is taken before each of the recipe's layers ``l`` from layer ``l - 1``. Choice made here: in the paper variant, the mean over
queries counts every valid query row (rows that cannot see token j by causality contribute 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ..recipe import Recipe
from .base import OneLayerPruner, Selection, View, budget_keep, kept_counts, top_visual


@dataclass
class FastV(OneLayerPruner):
    """Options: ``layer`` K (>= 1), ``keep`` fraction of visual tokens kept (1 - R; default 0.5) or
    ``flops`` target ratio (R chosen per sample to meet it), ``variant``; or a fitted ``recipe`` in
    place of ``layer``, ``keep`` and ``flops``."""

    layer: int = 2
    keep: float | None = None
    variant: Literal["code", "paper"] = "code"
    flops: float | None = None
    recipe: Recipe | dict | str | Path | None = None

    name: ClassVar[str] = "fastv"
    schedule_options: ClassVar[tuple[str, ...]] = ("layer", "keep", "flops")
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024"
    needs: ClassVar[tuple[str, ...]] = ("attention",)

    def validate(self) -> None:
        self.load_recipe()
        if self.recipe is None:
            self.keep = budget_keep(self.keep, self.flops)
        if self.variant not in ("code", "paper"):
            raise ValueError(f"variant must be 'code' or 'paper', got {self.variant!r}")

    def select(self, view: View) -> Selection:
        queries = "last" if self.variant == "code" else "all"
        probs = view.attention(queries)  # (B, H, q, n)
        qvalid = view.query_valid(queries).to(probs.dtype)  # (B, q)
        received = (probs.mean(1) * qvalid[..., None]).sum(1) / qvalid.sum(1, keepdim=True)
        counts = self.recipe_kept(view) if self.recipe else kept_counts(view, self.layer, self.keep, self.flops)
        return Selection(keep=top_visual(received, view.visual, counts))
