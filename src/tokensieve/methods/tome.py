"""ToMe: token merging inside the vision tower's blocks, by bipartite soft matching, size-weighted.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv 2210.09461); authors' code
facebookresearch/ToMe (read at commit af95e4b). What the release does, and this module restates:

* ``tome/patch/timm.py`` ``ToMeBlock.forward``: in every block, attention runs first, then ``r`` tokens
  merge (between the attention residual and the MLP), then the MLP runs on the reduced set;
* ``ToMeAttention.forward``: proportional attention adds ``log(size)`` of each key token to the
  attention logits (after scaling, before the softmax); the matching metric is the block's own keys
  averaged over heads (``k.mean(1)``);
* ``tome/merge.py`` ``bipartite_soft_matching``: the metric is L2-normalised; set A is the even, set B
  the odd tokens of the current order; the [CLS] token (the first A token) never merges (its scores are
  ``-inf``); each A token's most similar B token is its edge; the ``r`` most similar edges merge; at most
  ``(t - protected) // 2`` tokens per block; the result is the unmerged A tokens (in order, [CLS] first)
  followed by all B tokens;
* ``merge_wavg``: a merged token is the size-weighted average of its members, its size their sum;
  ``merge_source``: which original tokens each merged token holds;
* ``tome/utils.py`` ``parse_r``: ``r`` per block from a constant ``r`` or an ``(r, inflection)`` pair
  (inflection -1: the paper's decreasing schedule, from ``2r`` at the first block to 0 at the last).

The method only chooses (the schedule and the matching); the engine's tower stage
(:mod:`tokensieve.tower`) runs the blocks up to the LLaVA feature layer with attention bias, merges,
size and group tracking, and expands the feature layer's output back to one row per patch so the
model's own code runs unchanged. At decoder layer 0 this method keeps one LLM token per group: the row
of the group's *representative* (its smallest original patch index), whose projected feature is the
group's; ``run.tower.merged`` lists, per sample, the original positions each kept token stands for.

Budget (r per block): with ``keep``, each image of ``N`` patches keeps ``K = max(1, round(keep * N))``
groups, whatever the prompt (so a count known from image size and budget alone); with ``flops``, a
sample keeps the most visual tokens that meet the target (as every encoder method), split evenly over
its images (the first images take the remainder). An image then needs ``R = N - K`` merges over the
``L`` tower blocks up to and including the feature layer:

* ``schedule="constant"`` (ToMe's constant ``r``): ``R // L`` per block, one more in the first
  ``R % L`` blocks;
* ``schedule="decreasing"`` (ToMe's ``(r, -1)``): shares proportional to ``L - 1 - l`` (all in block
  0 when ``L == 1``), rounded by largest remainder;

the tokens left after each block follow those shares, clamped to ToMe's cap (at most ``(t - 1) // 2``
of ``t`` tokens merge in a block) and to the most from which the remaining blocks can still reach the
target by merging at their caps. A budget beyond what the cap in every block can reach raises
ValueError. ``r`` gives ToMe's own parameter instead (``parse_r`` with the schedule's inflection,
capped per block as the release caps it); the kept count then follows from the tower. ``keep=1`` (or
``r=0``) merges nothing: the model runs untouched. ``prop_attn`` (default True, the release's default
for off-the-shelf models) toggles the size bias.
Positions: ``"auto"`` renumbers the shorter prompt (as other encoder-stage methods on LLaVA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from ..flops import Shape, solve_kept
from .base import EncoderPruner, Selection, budget_keep, layer_schedule

if TYPE_CHECKING:
    from ..tower import TowerView


def parse_r(num_blocks: int, r: int, inflect: float = 0.0) -> list[int]:
    """ToMe's ``tome/utils.py`` ``parse_r`` for ``(r, inflect)``: ``r`` per block, trending up (+1),
    constant (0) or down (-1). With one block (where the release divides by zero) the block gets ``r``."""
    if num_blocks == 1:
        return [r]
    low = int(r * (1.0 - inflect))
    step = (2 * r - 2 * low) / (num_blocks - 1)
    return [int(low + step * i) for i in range(num_blocks)]


def capped(schedule: list[int], n_patches: int) -> list[int]:
    """``schedule`` with each block's ``r`` capped as ``bipartite_soft_matching`` caps it: at most
    ``(t - 1) // 2`` of the ``t`` tokens ([CLS] included, protected) entering the block."""
    tokens, out = n_patches + 1, []
    for r in schedule:
        r = max(0, min(r, (tokens - 1) // 2))
        out.append(r)
        tokens -= r
    return out


def fewest_kept(n_patches: int, blocks: int) -> int:
    """Fewest patches ToMe can leave after ``blocks`` blocks: the cap in every block."""
    return n_patches - sum(capped([n_patches] * blocks, n_patches))


def fit_schedule(n_patches: int, blocks: int, kept: int, schedule: str = "constant") -> list[int]:
    """``r`` per block that leaves exactly ``kept`` of ``n_patches`` patches after ``blocks`` blocks.

    Raises:
        ValueError: ``kept`` is below :func:`fewest_kept` (or outside ``1..n_patches``).
    """
    least = fewest_kept(n_patches, blocks)
    if not least <= kept <= n_patches:
        raise ValueError(f"tome: keeping {kept} of {n_patches} patches is out of reach: ToMe merges at most half of "
                         f"the tokens in each of the {blocks} vision block(s) up to the feature layer, which leaves "
                         f"at least {least} (keep >= {least / n_patches:.3f})")
    merges = n_patches - kept
    if schedule == "decreasing" and blocks > 1:
        weights = [blocks - 1 - l for l in range(blocks)]
    else:
        weights = [1] * blocks
    ideal = [merges * w / sum(weights) for w in weights]
    shares = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(blocks), key=lambda l: (-(ideal[l] - shares[l]), l))
    for l in by_remainder[: merges - sum(shares)]:
        shares[l] += 1
    # tokens after each block follow the shares, clamped to ToMe's cap (at least ceil((t + 1) / 2) stay)
    # and to the most tokens from which the remaining blocks can still reach kept + 1 by halving
    most = [kept + 1]
    for _ in range(blocks):
        most.insert(0, 2 * most[0] - 1)
    tokens, target, out = n_patches + 1, n_patches + 1, []
    for l in range(blocks):
        target -= shares[l]
        after = min(max(target, (tokens + 2) // 2), tokens, most[l + 1])
        out.append(tokens - after)
        tokens = after
    return out


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> torch.Tensor | None:
    """ToMe's ``tome/merge.py`` ``bipartite_soft_matching`` with the [CLS] token protected, as a map.

    Args:
        metric: ``(I, t, c)`` the block's keys averaged over heads, [CLS] first.
        r: tokens to merge away (capped at ``(t - 1) // 2``).

    Returns:
        ``(I, t)`` long: for each token, its index in the merged sequence of ``t - r`` tokens (the
        unmerged A tokens in order, then the B tokens, as the release orders them); None when ``r`` is 0.
    """
    images, t, _ = metric.shape
    r = min(r, (t - 1) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf
        best, partner = scores.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)
        unmerged = edges[:, r:].sort(dim=-1).values
        merged = edges[:, :r]
        left = unmerged.shape[1]
        dest_a = torch.empty_like(best, dtype=torch.long)
        dest_a.scatter_(1, unmerged, torch.arange(left, device=metric.device).expand(images, -1))
        dest_a.scatter_(1, merged, left + partner.gather(1, merged))
        dest = torch.empty(images, t, dtype=torch.long, device=metric.device)
        dest[:, ::2] = dest_a
        dest[:, 1::2] = left + torch.arange(b.shape[1], device=metric.device)
    return dest


@dataclass
class ToMe(EncoderPruner):
    """Options: ``keep`` fraction of visual tokens (default 0.5) or ``flops`` target, or ToMe's own ``r``
    (tokens merged per block); ``schedule`` ("constant" or "decreasing"), ``prop_attn``, ``positions``."""

    r: int | None = None
    schedule: Literal["constant", "decreasing"] = "constant"
    prop_attn: bool = True

    name: ClassVar[str] = "tome"
    paper: ClassVar[str] = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    needs: ClassVar[tuple[str, ...]] = ("tower",)

    def validate(self) -> None:
        if self.r is not None:
            if self.keep is not None or self.flops is not None:
                raise ValueError("tome: give r (tokens merged per vision block) or keep/flops, not both")
            if self.r < 0:
                raise ValueError(f"tome: r must be >= 0, got {self.r}")
        else:
            self.keep = budget_keep(self.keep, self.flops)
        if self.positions not in ("auto", "keep", "renumber"):
            raise ValueError(f"positions must be 'auto', 'keep' or 'renumber', got {self.positions!r}")

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        if self.r is not None:
            raise ValueError("tome with r: the visual tokens left depend on the vision tower's depth; give keep instead")
        return layer_schedule(num_layers, n_visual, 0, self.keep)

    def check_tower(self, n_patches: int, blocks: int) -> None:
        """Raise ValueError before anything runs when a ``keep`` budget is out of ToMe's reach."""
        if self.keep is not None:
            fit_schedule(n_patches, blocks, max(1, round(self.keep * n_patches)), self.schedule)

    def tower_plan(self, images: list[int], text: list[int], n_patches: int, blocks: int,
                   shape: Shape) -> list[list[int]]:
        """``r`` per block for every image of the batch (in input order), see the module docstring.

        Args:
            images: per sample, its number of images (0 for text-only samples).
            text: per sample, its real non-visual tokens (for ``flops``).
            n_patches: patches per image; blocks: tower blocks up to and including the feature layer.
        """
        plans: list[list[int]] = []
        for m, t in zip(images, text):
            if m == 0:
                continue
            if self.r is not None:
                inflect = -1.0 if self.schedule == "decreasing" else 0.0
                plans += [capped(parse_r(blocks, self.r, inflect), n_patches)] * m
                continue
            if self.flops is None:
                plans += [fit_schedule(n_patches, blocks, max(1, round(self.keep * n_patches)), self.schedule)] * m
                continue
            kept = solve_kept(shape, m * n_patches, t, 0, self.flops)
            for j in range(m):
                share = max(1, kept // m + (1 if j < kept % m else 0))
                plans.append(fit_schedule(n_patches, blocks, share, self.schedule))
        return plans

    def match(self, metric: torch.Tensor, r: int) -> torch.Tensor | None:
        """The merge map of one block (see :func:`bipartite_soft_matching`)."""
        return bipartite_soft_matching(metric, r)

    def select(self, view: "TowerView") -> Selection:
        """Keep every non-visual row and the representative row of each merged group."""
        return Selection(keep=~view.visual | view.tower.representative)
