"""ToMe's bipartite soft matching for a ViT without a [CLS] token, and its size-weighted merge.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023; authors' code facebookresearch/ToMe
(read at commit af95e4b), ``tome/merge.py`` ``bipartite_soft_matching`` with ``class_token=False`` and
``distill_token=False`` (the spatiotemporal MAE models of the paper's video experiments have no
[CLS]): metric L2-normalised; A = even, B = odd tokens of the current order; each A token's most
similar B token is its edge; the ``r`` most similar edges merge (at most ``t // 2``); the result is the
unmerged A tokens in *descending-similarity order* (the release sorts them back only with a class
token) followed by all B tokens. ``merge_wavg``: a merged token is the size-weighted mean of its
members, sizes add. (:mod:`tokensieve.methods.tome` has the LLaVA tower's version, which always
protects the first token and re-sorts the unmerged ones, as the release does with ``class_token``.)
Ties in the sort go to the earlier A token (stable sort; the release's ``argsort`` leaves them open).
"""

from __future__ import annotations

import torch


def bipartite_merge_map(metric: torch.Tensor, r: int) -> torch.Tensor:
    """``(B, t)`` long: for each token, its row in the merged sequence of ``t - min(r, t // 2)`` rows.

    Args:
        metric: ``(B, t, c)`` the block's keys averaged over heads.
        r: tokens to merge away; at least 1.
    """
    batch, t, _ = metric.shape
    r = min(r, t // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    best, partner = scores.max(dim=-1)
    edges = torch.sort(best, dim=-1, descending=True, stable=True).indices
    unmerged, merged = edges[:, r:], edges[:, :r]
    left = unmerged.shape[1]
    dest_a = torch.empty_like(partner)
    dest_a.scatter_(1, unmerged, torch.arange(left, device=metric.device).expand(batch, -1))
    dest_a.scatter_(1, merged, left + partner.gather(1, merged))
    dest = torch.empty(batch, t, dtype=torch.long, device=metric.device)
    dest[:, ::2] = dest_a
    dest[:, 1::2] = left + torch.arange(t // 2, device=metric.device)
    return dest


def merge_weighted(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_wavg``: ``(B, k, C)`` size-weighted means of the rows of ``x`` ``(B, t, C)`` that ``dest``
    ``(B, t)`` sends to each of the ``k`` merged rows, and their ``(B, k)`` summed sizes."""
    rows = int(dest.max()) + 1
    total = size.new_zeros(size.shape[0], rows).scatter_add_(1, dest, size)
    sums = x.new_zeros(x.shape[0], rows, x.shape[-1]).scatter_add_(1, dest[..., None].expand_as(x), x * size[..., None])
    return sums / total[..., None], total
