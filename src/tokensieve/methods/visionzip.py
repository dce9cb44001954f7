"""VisionZip: dominant tokens by [CLS] attention plus a few contextual tokens merged by key similarity.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025
(arXiv 2412.04467); authors' code dvlab-research/VisionZip (read at commit 3151f6d).

The release (``layout="release"``, the default), per image, at the vision layer whose output the LLM
receives (``visionzip/utils.py`` ``apply_info`` sets the merge metric on layer 22 of 24 = LLaVA's
``vision_feature_layer`` -2; ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``):
    1. dominant: ``visionzip/main.py`` ``visionzip(model, dominant, contextual)`` calls
       ``apply_info(dominant_num=dominant - 1)``: the [CLS] token plus the ``dominant - 1`` patches with
       the most [CLS] attention (summed over heads), gathered in their original order ([CLS] first);
    2. contextual: the other patches in original order; ``contextual`` targets at the stride
       ``max(1, rest // contextual)``; every other patch joins the target whose key (the layer's
       ``k_proj`` of its normed input, mean over heads, L2-normalised) is most similar; a contextual
       token is the target's feature plus the mean of the features that joined it;
    3. ``torch.cat([dominant_tokens, contextual_tokens])`` goes through the projector
       (``visionzip/llava_arch.py`` ``encode_images_visionzip``) and replaces the image's tokens in
       the prompt: the LLM receives ``[CLS, dominant in original order, contextual]``, ``dominant +
       contextual`` tokens per image, each image of a sample with its own fixed count.
Here: the image's tokens are carried on ``dominant + contextual`` of its rows, the union of the
dominant patches' and the contextual targets' rows plus, for [CLS], the image's first row not already
among them; the release's sequence is written onto these rows in row order ([CLS] on the first,
then the dominant patches, contextual tokens on the last rows). With ``positions="auto"`` (renumbered,
as the release does) the LLM therefore receives the release's sequence exactly; with
``positions="keep"`` the tokens take those rows' rotary positions. The report's ``visual_kept`` names
the carrying rows: the dominant patches, the contextual targets and the [CLS] carrier.

Differences from the release:
    * [CLS] feature: the vision tap provides the feature layer's [CLS] row
      (``VisionSignals.cls_features``, ``(I, d)``); a tap without it leaves the [CLS] token out, and the
      LLM receives the release's sequence without its first token.
    * Where an image's budget covers all of its tokens (``dominant + contextual >= N``, e.g. ``keep=1``)
      the image is left untouched (the release would still swap a patch for [CLS] and merge).
    * ``dominant`` must be >= 1 (it counts [CLS]); ``contextual=0`` keeps no contextual token (the
      release divides by it).
    * ``keep`` / ``flops`` give the count per image, split in the release's 54:10 proportion
      (``README.md``: ``visionzip(model, dominant=54, contextual=10)``); ``keep``: ``round(keep * N)``
      per image; ``flops``: the sample's affordable count shared over its images in proportion to
      their tokens (largest remainder), so the sample meets it.

``layout="tokensieve"`` keeps this library's earlier rule: ``dominant`` counts patches only ([CLS] is
never fed), the sample's images form one pool with one budget, and each contextual token takes its
target patch's place (position) in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import EncoderPruner, Selection, View, kept_counts, split_budget

CONTEXTUAL_SHARE = 10 / 64


def contextual_merge(features: torch.Tensor, metric: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's contextual tokens from the non-dominant patches (in original order).

    Args:
        features: ``(m, d)`` their features; metric: ``(m, c)`` their keys; count: targets wanted.

    Returns:
        ``(k,)`` target indices into the ``m`` rows and ``(k, d)`` contextual tokens, ``k = min(count, m)``.
    """
    m = features.shape[0]
    count = min(count, m)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device), features[:0]
    step = max(1, m // count)
    targets = torch.arange(0, m, step, device=features.device)[:count]
    others = torch.ones(m, dtype=torch.bool, device=features.device)
    others[targets] = False
    merged = features[targets].clone()
    if others.any():
        normed = torch.nn.functional.normalize(metric.float(), dim=-1)
        owner = (normed[others] @ normed[targets].T).argmax(1)
        sums = torch.zeros_like(merged).index_add_(0, owner, features[others])
        sizes = torch.zeros(count, device=features.device).index_add_(0, owner, torch.ones_like(owner, dtype=torch.float))
        merged = merged + sums / sizes.clamp(min=1)[:, None].to(sums.dtype)
    return targets, merged


@dataclass
class VisionZip(EncoderPruner):
    """Options: ``dominant`` and ``contextual`` counts per image (``dominant`` includes [CLS], as in the
    release), or ``keep`` / ``flops``; ``layout`` ("release" or "tokensieve"); ``positions``."""

    dominant: int | None = None
    contextual: int | None = None
    layout: Literal["release", "tokensieve"] = "release"

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = "Yang et al., VisionZip: Longer is Better but Not Necessary in VLMs, CVPR 2025"
    needs: ClassVar[tuple[str, ...]] = ("cls attention", "vision keys")

    def validate(self) -> None:
        if self.layout not in ("release", "tokensieve"):
            raise ValueError(f"layout must be 'release' or 'tokensieve', got {self.layout!r}")
        counts = (self.dominant, self.contextual)
        if any(c is not None for c in counts):
            if any(c is None or c < 0 for c in counts) or self.keep is not None or self.flops is not None or sum(counts) < 1:
                raise ValueError("give dominant and contextual (>= 0, not both 0) together, or keep / flops instead")
            if self.layout == "release" and self.dominant < 1:
                raise ValueError("dominant counts the [CLS] token in the release's layout (visionzip/main.py passes "
                                 "dominant - 1 patches): give dominant >= 1")
            if self.positions not in ("auto", "keep", "renumber"):
                raise ValueError(f"positions must be 'auto', 'keep' or 'renumber', got {self.positions!r}")
        else:
            super().validate()

    def _split(self, total: int) -> tuple[int, int]:
        if self.dominant is not None:
            return self.dominant, self.contextual
        contextual = max(1, round(total * CONTEXTUAL_SHARE)) if total > 1 else 0
        return total - contextual, contextual

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """One image of ``n_visual`` tokens (the release's count per image)."""
        kept = min(n_visual, sum(self._split(max(1, round((0.5 if self.keep is None else self.keep) * n_visual)))))
        return [kept] * num_layers, [kept] * num_layers

    def select(self, view: View) -> Selection:
        if view.project is None:
            raise ValueError("visionzip needs a model whose projector can be applied to merged vision features")
        if self.layout == "tokensieve":
            return self._select_pooled(view)
        return self._select_release(view)

    # ------------------------------------------------------------------ the release's layout
    def _image_budgets(self, view: View) -> list[list[int]]:
        """Tokens per image (dominant + contextual), per sample."""
        out = []
        totals = kept_counts(view, 0, None, self.flops) if self.flops is not None else None
        for b, images in enumerate(view.vision.images):
            sizes = [cols.numel() for cols, _ in images]
            if self.dominant is not None:
                out.append([self.dominant + self.contextual] * len(sizes))
            elif totals is not None:
                out.append([max(1, t) for t in split_budget(totals[b], sizes)])
            else:
                out.append([max(1, round(self.keep * n)) for n in sizes])
        return out

    def _select_release(self, view: View) -> Selection:
        vision = view.vision
        keep = ~view.visual
        hidden = view.hidden.clone()
        cls_features = getattr(vision.raw, "cls_features", None)
        for b, budgets in enumerate(self._image_budgets(view)):
            for (cols, image), total in zip(vision.images[b], budgets):
                n = cols.numel()
                if self.dominant is not None:
                    dominant, contextual = self.dominant, self.contextual
                else:
                    dominant, contextual = self._split(total)
                if dominant + contextual >= n:
                    keep[b, cols] = True
                    continue
                patches = dominant - 1  # the release's dominant_num: [CLS] is the other one
                if cls_features is None and patches + contextual == 0:
                    patches = 1  # no [CLS] to feed: the image keeps its top patch
                top = vision.cls_attention[b, cols].topk(patches).indices.sort().values
                rest = torch.ones(n, dtype=torch.bool, device=cols.device)
                rest[top] = False
                rest = rest.nonzero().squeeze(1)
                targets, merged = contextual_merge(vision.features[b, cols[rest]], vision.keys[b, cols[rest]], contextual)
                carriers = torch.cat([cols[top], cols[rest[targets]]])
                with torch.no_grad():
                    tokens = [hidden.new_zeros(0, hidden.shape[-1])]
                    if cls_features is not None:
                        free = torch.ones(n, dtype=torch.bool, device=cols.device)
                        free[top] = False
                        free[rest[targets]] = False
                        carriers = torch.cat([carriers, cols[free.nonzero()[0]]])
                        tokens.append(view.project(cls_features[image][None, None].to(vision.features.dtype))[0].to(hidden.dtype))
                    tokens.append(view.hidden[b, cols[top]])
                    if merged.shape[0]:
                        tokens.append(view.project(merged[None])[0].to(hidden.dtype))
                    hidden[b, carriers.sort().values] = torch.cat(tokens)
                keep[b, carriers] = True
        return Selection(keep=keep, hidden=hidden)

    # ------------------------------------------------------------------ layout="tokensieve"
    def _select_pooled(self, view: View) -> Selection:
        """The earlier rule: ``dominant`` patches (no [CLS]) and ``contextual`` tokens per sample (its
        images in one pool), each contextual token at its target patch's place."""
        keep = ~view.visual
        hidden = view.hidden.clone()
        counts = kept_counts(view, 0, self.keep, self.flops) if self.dominant is None else None
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if cand.numel() == 0:
                continue
            dominant, contextual = self._split(counts[b] if counts is not None else 0)
            dominant = min(dominant, cand.numel())
            top = view.vision.cls_attention[b, cand].topk(dominant).indices
            keep[b, cand[top]] = True
            rest = cand[~torch.isin(cand, cand[top])]
            targets, merged = contextual_merge(view.vision.features[b, rest], view.vision.keys[b, rest], contextual)
            if targets.numel() == 0:
                continue
            with torch.no_grad():
                hidden[b, rest[targets]] = view.project(merged[None]).to(hidden.dtype)[0]
            keep[b, rest[targets]] = True
        return Selection(keep=keep, hidden=hidden)
