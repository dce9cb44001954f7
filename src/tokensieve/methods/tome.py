"""ToMe-style merging of the visual tokens before the LLM: bipartite soft matching, size-weighted.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv 2210.09461); authors' code
facebookresearch/ToMe. Here the matching is applied to the visual tokens entering the LLM.

Per sample, while more than k visual tokens remain (at most half of them merge per round):
    1. metric: the patch keys of the vision layer whose output the LLM receives (mean over heads),
       L2-normalised; tokens alternate into sets A and B in position order;
    2. each A token's most similar B token is its edge; the r most similar edges merge;
    3. a merged token is the size-weighted average of its members (features and metric alike), its
       size the sum of theirs; it takes the B token's position.
So sum over tokens of size x feature is preserved. Choices made here: merging acts on the projected
tokens (the LLM's inputs) rather than inside the ViT blocks, the visual tokens of a sample form one
pool, and no proportional-attention bias is added (the LLM's attention is left untouched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import EncoderPruner, Selection, View, kept_counts


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int):
    """One ToMe round on ``x`` (``(N, d)``), ``metric`` (``(N, c)``), ``size`` (``(N,)``).

    Returns the surviving indices (ascending) and their merged ``x``, ``metric`` and ``size``.
    """
    n = x.shape[0]
    a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
    r = min(r, a.numel())
    m = torch.nn.functional.normalize(metric, dim=-1)
    scores = m[a] @ m[b].T
    best, dest = scores.max(1)
    merged_a = best.argsort(descending=True)[:r]
    keep = torch.ones(n, dtype=torch.bool)
    keep[a[merged_a]] = False
    weighted_x, weighted_m, total = x * size[:, None], metric * size[:, None], size.clone()
    target = b[dest[merged_a]]
    weighted_x.index_add_(0, target, weighted_x[a[merged_a]])
    weighted_m.index_add_(0, target, weighted_m[a[merged_a]])
    total.index_add_(0, target, size[a[merged_a]])
    idx = keep.nonzero().squeeze(1)
    return idx, weighted_x[idx] / total[idx, None], weighted_m[idx] / total[idx, None], total[idx]


@dataclass
class ToMe(EncoderPruner):
    """Options: ``keep`` fraction of visual tokens (default 0.5) or ``flops`` target, ``positions``."""

    name: ClassVar[str] = "tome"
    paper: ClassVar[str] = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    needs: ClassVar[tuple[str, ...]] = ("vision keys",)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge the rows of ``x`` down to ``k``; returns surviving row indices, merged rows and sizes."""
        index = torch.arange(x.shape[0])
        size = torch.ones(x.shape[0], dtype=torch.float32)
        x, metric = x.float(), metric.float()
        while index.numel() > k:
            idx, x, metric, size = bipartite_merge(x, metric, size, index.numel() - k)
            index = index[idx]
        return index, x, size

    def select(self, view: View) -> Selection:
        keep = ~view.visual
        hidden = view.hidden.clone()
        counts = kept_counts(view, 0, self.keep, self.flops)
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if cand.numel() == 0:
                continue
            index, merged, _ = self.merge(view.hidden[b, cand].cpu(), view.vision.keys[b, cand].cpu(), counts[b])
            rows = cand[index.to(cand.device)]
            hidden[b, rows] = merged.to(hidden)
            keep[b, rows] = True
        return Selection(keep=keep, hidden=hidden)
