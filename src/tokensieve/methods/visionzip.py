"""VisionZip: dominant tokens by [CLS] attention plus a few contextual tokens merged by key similarity.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025
(arXiv 2412.04467); authors' code dvlab-research/VisionZip.

Per sample (the patches of its images in one pool), at the vision layer whose output the LLM receives:
    1. dominant: the ``dominant`` patches with the most [CLS] attention (summed over heads);
    2. contextual: among the rest, ``contextual`` targets taken at an even stride; every other
       remaining patch joins the target whose key (mean over heads, L2-normalised) is most similar;
       a contextual token is the target's feature plus the mean of the features that joined it;
    3. the contextual features (vision space) go through the projector; each takes the target's place.
Counts: ``dominant`` and ``contextual`` directly, or ``keep`` / ``flops`` split in the paper's
54:10 proportion. Choices made here: the [CLS] token, which the release keeps among the dominant
tokens, has no position in a LLaVA-1.5 prompt, so all dominant tokens are patches; positions
``"auto"`` renumbers the shorter prompt (the release's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import EncoderPruner, Selection, View, kept_counts

CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZip(EncoderPruner):
    """Options: ``dominant`` and ``contextual`` counts per sample, or ``keep`` / ``flops``; ``positions``."""

    dominant: int | None = None
    contextual: int | None = None

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = "Yang et al., VisionZip: Longer is Better but Not Necessary in VLMs, CVPR 2025"
    needs: ClassVar[tuple[str, ...]] = ("cls attention", "vision keys")

    def validate(self) -> None:
        counts = (self.dominant, self.contextual)
        if any(c is not None for c in counts):
            if any(c is None or c < 0 for c in counts) or self.keep is not None or self.flops is not None or sum(counts) < 1:
                raise ValueError("give dominant and contextual (>= 0, not both 0) together, or keep / flops instead")
        else:
            super().validate()

    def _split(self, total: int) -> tuple[int, int]:
        if self.dominant is not None:
            return self.dominant, self.contextual
        contextual = max(1, round(total * CONTEXTUAL_SHARE)) if total > 1 else 0
        return total - contextual, contextual

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        kept = sum(self._split(max(1, round((0.5 if self.keep is None else self.keep) * n_visual))))
        return [kept] * num_layers, [kept] * num_layers

    def select(self, view: View) -> Selection:
        if view.project is None:
            raise ValueError("visionzip needs a model whose projector can be applied to merged vision features")
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
            contextual = min(contextual, rest.numel())
            if contextual == 0:
                continue
            step = max(1, rest.numel() // contextual)
            targets = rest[torch.arange(0, rest.numel(), step, device=rest.device)[:contextual]]
            others = rest[~torch.isin(rest, targets)]
            metric = torch.nn.functional.normalize(view.vision.keys[b].float(), dim=-1)
            feats = view.vision.features[b]
            merged = feats[targets].clone()
            if others.numel():
                owner = (metric[others] @ metric[targets].T).argmax(1)
                sums = torch.zeros_like(merged).index_add_(0, owner, feats[others])
                sizes = torch.zeros(contextual, device=feats.device).index_add_(0, owner, torch.ones_like(owner, dtype=torch.float))
                merged = merged + sums / sizes.clamp(min=1)[:, None]
            with torch.no_grad():
                hidden[b, targets] = view.project(merged[None]).to(hidden.dtype)[0]
            keep[b, targets] = True
        return Selection(keep=keep, hidden=hidden)
