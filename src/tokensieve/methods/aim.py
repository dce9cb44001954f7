"""AIM: merge similar visual tokens before the LLM, then drop them progressively by PageRank importance.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025
(arXiv 2412.03248); authors' code LaVi-Lab/AIM, read at commit edc24e9.

What the release does:

1. Merge, before the LLM: ``llava/model/llava_arch.py`` ``LlavaMetaForCausalLM.get_2dPool`` (l.193-195)
   calls ``llava/model/token_merge.py`` ``bipartite_soft_matching_merge`` twice on the projected
   tokens of every frame, each frame on its own (the frames are the batch dimension), a fixed ratio per
   frame: the first round removes ``N // 2`` and the second ``N // 4`` of the frame's ``N`` tokens (25%
   kept; commented-out lines go on with ``N // 8``, ``N // 16``, ...). One round on ``t`` tokens: the
   metric is the tokens themselves, L2-normalised; the even-indexed tokens are sources, the odd-indexed
   ones destinations; every source finds its most similar destination; the ``r`` sources with the
   highest such similarity (``argsort`` descending; ``r`` capped at ``t // 2``) are averaged into their
   destinations (``scatter_reduce(..., reduce="mean")``, which includes the destination: the plain mean
   of its current feature and the sources that join it); the result is ``cat([unmerged sources, ranked
   by decreasing similarity, all destinations in order])``. The merged tokens replace the frame's tokens
   and the prompt gets contiguous positions (``prepare_inputs_labels_for_multimodal``:
   ``position_ids = arange(cur_len)``).
2. Prune, inside the LLM: ``other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py``
   ``get_importance`` (l.61-78), called by ``Qwen2Attention.forward`` (l.357-363) at every prefill layer,
   and ``Qwen2Model.forward`` (l.934-1020). Importance at layer ``l`` is PageRank on that layer's own
   attention: ``M = softmax((q k^T / sqrt(d) + mask) / 0.1)`` per query head in float32, a start vector
   of ``1 / N`` on each of the ``N`` tokens, five steps ``dist <- dist @ M`` (damping 0), then the root
   mean square over heads. After layer ``l`` the text tokens (before and after the visual chunk) and the
   ``int(V * retain_rate[l])`` best of the ``V`` merged visual tokens stay, ``retain_rate[l] = max(0, 1 -
   (l - 13) * 0.125)`` for ``l >= 14`` and 1 below: 7/8 of ``V`` after layer 14, ..., 1/8 after layer
   20, none after layer 21 (of 28). The others are masked out as keys of every later layer.

What this module does:

* Merge, per image (each image grid of the layout; where the layout has none, LLaVA-NeXT or videos,
  each contiguous run of visual tokens), a fixed ratio per image: the kept fraction halves (1/2, 1/4, ...)
  while it stays >= ``merge_keep`` and then drops to ``merge_keep``; each round removes ``floor(N *
  drop)`` tokens (``drop``: how much the fraction falls), at most half of those it meets, by the
  release's round above. For
  ``merge_keep=0.25`` (the default) that is the release's ``N // 2`` then ``N // 4``; 1/8 gives its
  three commented rounds. With ``flops``, one ``merge_keep`` per sample is solved for the budget (the
  pruning schedule fixed) and every image of the sample uses it, so images share in proportion.
* The ``k`` merged tokens of an image are carried by ``k`` of its rows, those of the tokens that survive
  (the unmerged sources and the destinations; ``visual_kept`` names them). ``order="release"`` (the
  default) writes the release's sequence onto these rows in row order, so that with renumbered
  positions (``positions="auto"`` on LLaVA, as the release) the LLM receives exactly the release's
  sequence; with ``positions="keep"`` each token takes the position of the row it lands on. The
  release's order is the row order wherever every round merges all its sources (576 -> 288 -> 144, or
  144 -> 72 -> 36); it differs where a round leaves sources unmerged, which it puts first (odd counts
  such as 169, partial rounds such as ``merge_keep=0.375``). ``order="rows"`` puts each merged token on
  the row of the token it grew from (its destination, or itself), tokensieve's earlier rule: with
  ``positions="keep"`` a token then sits at one of its members' positions. ``positions="auto"`` keeps
  the positions on M-RoPE models (Qwen2-VL).
* Prune: the tokens ranked at layer ``l`` leave at the boundary after it, for ``l = start .. stop``, and
  ``floor(V * (stop - l) / (stop - start + 1))`` visual tokens stay, ``V`` the sample's merged count:
  the release's ``int(V * retain_rate[l])`` for ``start=14, stop=21`` on 28 layers. Defaults: the
  release's layers for its two depths, 14..21 of 28 and 13..20 of 32 (its LLaVA-1.5 script,
  ``other_packages/LLaVA-PruMerge/modeling_llama.py`` ``LlamaModel.forward`` l.703, with the same rule
  and PageRank); other depths get 14/28 and 21/28 of theirs, rounded (4..6 of the shipped model's 8).
  PageRank as the release, started uniformly on the tokens present. A sample's images compete in one
  ranking (the release has one visual chunk per sample; a video's frames compete so).

Differences from the release:

* The release keeps pruned tokens as masked query rows: from its second pruning layer on, PageRank
  also starts on them (``1/N`` each) and their attention rows enter its first step. Here they have
  left, so the start is uniform over the tokens present. The first pruning layer ranks exactly as the
  release and the tokens that stay compute the same states, but later rankings may differ: on the
  shipped model with the defaults one token of 12 differs at the second stage on 7 of 15 items (last
  logits within 0.14, same top token); with seven pruning layers up to a third of a late stage differs.
* Merging runs in float32 (the release in the model's dtype).
* Videos and grid-less layouts merge a whole run of visual tokens as one image, where the release
  merges every frame on its own; its Qwen2-VL video path
  (``models/qwen2_vl/modeling_qwen2_vl.py``, ``Qwen2VLForConditionalGeneration.forward`` l.1708-1712)
  also merges a few more tokens per frame to fit a smaller M-RoPE grid and places the tokens on it in
  its order (and its boundaries leave the last video token unpruned); here they keep the positions of
  their rows. The release merges no still images on LLaVA-OneVision or Qwen2-VL.
* Its LLaVA-1.5 image script (``other_packages/LLaVA-PruMerge/llava/model/multimodal_encoder/
  clip_encoder.py``, ``CLIPVisionTower.forward`` l.346-357) merges the CLIP features before the
  projector with the last CLIP layer's keys as the metric (``r`` 288 then 36: 43.75% kept); here the
  projected tokens are their own metric (``merge_keep=0.4375`` gives the same counts).
* Batches: the release's kept count uses the first sample's text count for every sample (it runs
  batch 1); here each sample has its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from .base import Method, Point, Selection, View, check_budget, check_fraction, top_visual
from .schedule import solve_scale

PAGERANK_TEMPERATURE = 0.1
PAGERANK_STEPS = 5
# the release's pruning layers (start, stop) by decoder depth: Qwen2-7B (LLaVA-OneVision) and Vicuna-7B (LLaVA-1.5)
PUBLISHED_LAYERS = {28: (14, 21), 32: (13, 20)}


def merge_rounds(n: int, fraction: float) -> list[int]:
    """Tokens each merge round removes from an image of ``n`` tokens to keep ``fraction`` of them.

    The kept fraction halves while it stays >= ``fraction``, then drops to ``fraction``; a round removes
    ``floor(n * drop)``, at most half of the tokens it meets; empty rounds are left out. ``fraction=0.25``
    gives the release's ``[n // 2, n // 4]``.
    """
    rounds: list[int] = []
    left, level = n, 1.0
    while level > fraction:
        lower = max(level / 2, fraction)
        r = min(math.floor(n * (level - lower)), left // 2)
        if r > 0:
            rounds.append(r)
            left -= r
        level = lower
    return rounds


def merged_count(n: int, fraction: float) -> int:
    """Tokens an image of ``n`` keeps after :func:`merge_rounds` (43 of 169 for 0.25, 144 of 576)."""
    return n - sum(merge_rounds(n, fraction))


def bipartite_merge(x: torch.Tensor, rounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's tokens merged by the release's rounds of bipartite soft matching.

    Args:
        x: ``(N, d)`` the image's tokens in sequence order (also the metric).
        rounds: tokens each round removes, each at most half of those it meets.

    Returns:
        ``(carrier, merged)`` in the release's output order: ``(k,)`` long, the index in ``x`` of the
        token each merged token grew from (an unmerged source or a destination), and ``(k, d)`` float32
        merged tokens, ``k = N - sum(rounds)``.
    """
    carrier = torch.arange(x.shape[0], device=x.device)
    x = x.float()
    for r in rounds:
        unit = x / x.norm(dim=-1, keepdim=True)
        best, target = (unit[0::2] @ unit[1::2].T).max(-1)
        ranked = best.argsort(descending=True)
        joins, stays = ranked[:r], ranked[r:]
        sources = x[0::2]
        into = target[joins, None].expand(-1, x.shape[1])
        destinations = x[1::2].scatter_reduce(0, into, sources[joins], reduce="mean")
        x = torch.cat([sources[stays], destinations])
        carrier = torch.cat([carrier[0::2][stays], carrier[1::2]])
    return carrier, x


def pagerank(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` importance from attention ``probs`` (``(B, H, n, n)``, rows are queries): five steps
    ``dist <- dist @ probs`` from a uniform start over the ``valid`` (``(B, n)`` bool) rows, then the
    root mean square over heads."""
    dist = valid.float() / valid.float().sum(1, keepdim=True)
    dist = dist[:, None, None, :].expand(-1, probs.shape[1], 1, -1)
    for _ in range(PAGERANK_STEPS):
        dist = dist @ probs
    return dist[:, :, 0].pow(2).mean(1).sqrt()


def image_rows(view: View, b: int) -> list[torch.Tensor]:
    """Per image of sample ``b``, the ``(N_i,)`` view rows of its visual tokens in sequence order: the
    layout's image grids where they cover the visual rows, else each contiguous run of visual rows."""
    visual = view.visual[b].nonzero().squeeze(1)
    grids = view.grids[b]
    if grids and sum(g.index.numel() for g in grids) == visual.numel():
        return [g.index for g in grids]
    if visual.numel() == 0:
        return []
    breaks = ((visual.diff() != 1).nonzero().squeeze(1) + 1).tolist()
    return list(torch.tensor_split(visual, breaks))


@dataclass
class AIM(Method):
    """Options: ``merge_keep`` fraction per image after merging (or ``flops``), ``start`` and ``stop``
    layers of the pruning, ``positions`` of the merged prompt, ``order`` of the merged tokens on their rows."""

    merge_keep: float = 0.25
    start: int | None = None
    stop: int | None = None
    flops: float | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"
    order: Literal["release", "rows"] = "release"
    _merged: dict[int, int] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "aim"
    stages: ClassVar[tuple[str, ...]] = ("encoder", "prefill")
    paper: ClassVar[str] = "Zhong et al., AIM: Adaptive Inference of MLLMs via Token Merging and Pruning, ICCV 2025"
    needs: ClassVar[tuple[str, ...]] = ("projected visual tokens", "attention")

    def bind(self, num_layers: int) -> None:
        self.num_layers = num_layers
        start, stop = PUBLISHED_LAYERS.get(num_layers, (round(num_layers * 14 / 28), round(num_layers * 21 / 28)))
        self.start = start if self.start is None else int(self.start)
        self.stop = stop if self.stop is None else int(self.stop)
        if not 0 <= self.start <= self.stop < num_layers:
            raise ValueError(f"need 0 <= start <= stop < {num_layers}, got start={self.start}, stop={self.stop}")

    def validate(self) -> None:
        check_fraction("merge_keep", self.merge_keep)
        check_budget(None, self.flops)
        if self.positions not in ("auto", "keep", "renumber"):
            raise ValueError(f"positions must be 'auto', 'keep' or 'renumber', got {self.positions!r}")
        if self.order not in ("release", "rows"):
            raise ValueError(f"order must be 'release' or 'rows', got {self.order!r}")

    def positions_mode(self) -> Literal["keep", "renumber", "auto"]:
        return self.positions

    def points(self) -> list[Point]:
        encoder = [Point(before=0, stage="encoder")]
        return encoder + [Point(before=l + 1, attention_layer=l) for l in range(self.start, min(self.stop + 1, self.num_layers - 1))]

    def _kept(self, merged: int, layer: int) -> int:
        """Visual tokens of a sample with ``merged`` after merging that stay after pruning layer ``layer``."""
        return merged * (self.stop - layer) // (self.stop - self.start + 1)

    def _counts(self, merged: int) -> list[int]:
        """Visual tokens entering each decoder layer for a sample with ``merged`` after merging."""
        counts = []
        for layer in range(self.num_layers):
            last = layer - 1  # the last layer whose ranking has been applied
            counts.append(merged if last < self.start else self._kept(merged, min(last, self.stop)))
        return counts

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = self._counts(merged_count(n_visual, self.merge_keep))
        return counts, list(counts)

    def select(self, view: View) -> Selection:
        if view.point.stage == "encoder":
            return self._merge(view)
        scores = pagerank(view.attention("all", temperature=PAGERANK_TEMPERATURE), view.query_valid("all"))
        layer = view.point.attention_layer
        counts = [self._kept(self._merged.get(b, n), layer) for b, n in enumerate(view.visual.sum(1).tolist())]
        return Selection(keep=top_visual(scores, view.visual, counts))

    def _fraction(self, view: View, b: int, sizes: list[int]) -> float:
        """``merge_keep``, or with ``flops`` the largest fraction whose schedule meets it for sample ``b``."""
        if self.flops is None:
            return self.merge_keep
        visual = sum(sizes)
        text = int(view.query_valid("all")[b].sum()) - visual
        return solve_scale(view.shape, visual, text, lambda c: self._counts(sum(merged_count(n, c) for n in sizes)),
                           self.flops, f"aim pruning layers {self.start}..{self.stop}")

    def _merge(self, view: View) -> Selection:
        keep = ~view.visual
        hidden = view.hidden.clone()
        self._merged = {}
        for b in range(keep.shape[0]):
            images = image_rows(view, b)
            if not images:
                continue
            fraction = self._fraction(view, b, [rows.numel() for rows in images])
            self._merged[b] = 0
            for rows in images:
                carrier, merged = bipartite_merge(view.hidden[b, rows], merge_rounds(rows.numel(), fraction))
                slots = carrier.sort().values if self.order == "release" else carrier
                hidden[b, rows[slots]] = merged.to(hidden.dtype)
                keep[b, rows[carrier]] = True
                self._merged[b] += carrier.numel()
        return Selection(keep=keep, hidden=hidden)
