"""FasterVLM: keep the patches the vision tower's [CLS] token attends to most, before the LLM.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (arXiv 2412.01818); authors' code Theia-4869/FasterVLM.

Score of patch j: the attention of the [CLS] query to patch j, averaged over heads, at the vision
encoder layer whose output the LLM receives (LLaVA's ``vision_feature_layer``, -2); keep the top k of
each image, a fixed count per image as the release does (``llava/model/llava_arch.py``,
``encode_images``: ``topk(image_attentions.mean(dim=1), k=visual_token_num)`` per image row):
``round(keep * N)`` of an image's N patches, or with ``flops`` the sample's affordable count shared
over its images in proportion to their tokens.
The engine recomputes that one attention row from the layer's q/k projections, so the tower keeps
its attention backend. Positions: ``"auto"`` renumbers the shorter prompt (the released LLaVA code).
Towers without [CLS] (Qwen2-VL, SigLIP) raise a clear error. LLaVA-NeXT's per-crop variant is not
covered here: its anyres layout raises the same error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import EncoderPruner, Selection, View, kept_counts, split_budget


@dataclass
class FasterVLM(EncoderPruner):
    """Options: ``keep`` fraction of visual tokens (default 0.5) or ``flops`` target, ``positions``."""

    name: ClassVar[str] = "fastervlm"
    paper: ClassVar[str] = "Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning, 2024"
    needs: ClassVar[tuple[str, ...]] = ("cls attention",)

    def select(self, view: View) -> Selection:
        vision = view.vision
        keep = ~view.visual
        totals = kept_counts(view, 0, None, self.flops) if self.flops is not None else None
        for b, images in enumerate(vision.images):
            sizes = [cols.numel() for cols, _ in images]
            counts = split_budget(totals[b], sizes) if totals else [max(1, round(self.keep * n)) for n in sizes]
            for (cols, _), k in zip(images, counts):
                top = vision.cls_attention[b, cols].topk(max(1, min(k, cols.numel()))).indices
                keep[b, cols[top]] = True
        return Selection(keep=keep)
