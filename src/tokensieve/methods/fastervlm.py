"""FasterVLM: keep the patches the vision tower's [CLS] token attends to most, before the LLM.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (arXiv 2412.01818); authors' code Theia-4869/FasterVLM.

Score of patch j: the attention of the [CLS] query to patch j, averaged over heads, at the vision
encoder layer whose output the LLM receives (LLaVA's ``vision_feature_layer``, -2); keep the top k of
each crop, a fixed count per crop as the release does (``llava/model/llava_arch.py``,
``encode_images``: ``topk(image_attentions.mean(dim=1), k=visual_token_num)`` per row of the tower's
batch, the rows ``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select`` cuts from the
layer's attention, ``[:, :, 0, 1:]``): ``round(keep * N)`` (at least 1) of a crop's N patches, or with
``flops`` the sample's affordable count shared over its crops in proportion to their tokens. A
LLaVA-1.5 image is one crop. The engine recomputes that one attention row from the layer's q/k
projections, so the tower keeps its attention backend. Positions: ``"auto"`` renumbers the shorter
prompt (the released LLaVA code concatenates the kept tokens). Towers without [CLS] (Qwen2-VL, SigLIP)
raise a clear error.

LLaVA-NeXT (anyres), as the release runs it (``prepare_inputs_labels_for_multimodal``; its
``scripts/v1_6/eval`` pass ``--visual-token-num``, a count per crop out of 576): every crop of an image
(the base image, then the high-res crops row by row) goes through the CLIP tower in one batch, and each
crop keeps its own top ``visual_token_num`` patches. The release then forces
``mm_patch_merge_type = 'spatial'``, although LLaVA-NeXT was trained with ``'spatial_unpad'``: the LLM
receives the base image's kept patches in order, then the kept patches of the high-res crops in
row-major order over their joint grid, with no unpadding and no newline tokens.

Here, on the stock ``LlavaNextForConditionalGeneration``, whose packing always unpads the high-res
grid to the image's aspect ratio and puts an ``image_newline`` token after each of its rows: each crop
keeps its top ``round(keep * N)`` patches of the tower's capture of that crop (all N patches compete,
the release's count), and the kept patches stay where the model's packing puts them, which is the
release's order for every patch both feed. ``newlines="keep"`` (default) keeps every newline token, as
the model was trained; ``newlines="drop"`` removes them, as the release feeds none. With ``flops``,
the kept newline tokens are paid first and the rest of the sample's count is shared over its crops in
proportion to their patches that reach the LLM, each crop keeping its top ones among those (the
release has no FLOPs mode). The remaining difference from the release: a kept patch that the model's
unpadding removes (high-res rows or columns outside the image's aspect ratio) is not fed here, while
the release feeds it, so a high-res crop that reaches into that margin gives the LLM fewer than
``visual_token_num`` tokens; with ``newlines="drop"`` and an image whose grid it fits exactly, the LLM
receives the release's sequence (the [CLS] row is recomputed in float32 where the release reads the
tower's own attention map, which can only swap near-tied patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import EncoderPruner, Selection, View, kept_counts, split_budget


@dataclass
class FasterVLM(EncoderPruner):
    """Options: ``keep`` fraction of each crop's patches (default 0.5) or ``flops`` target,
    ``positions``, and ``newlines`` (LLaVA-NeXT's row-end newline tokens: ``"keep"`` or ``"drop"``)."""

    newlines: Literal["keep", "drop"] = "keep"

    name: ClassVar[str] = "fastervlm"
    paper: ClassVar[str] = "Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning, 2024"
    needs: ClassVar[tuple[str, ...]] = ("cls attention", "crops")

    def validate(self) -> None:
        super().validate()
        if self.newlines not in ("keep", "drop"):
            raise ValueError(f"newlines must be 'keep' or 'drop', got {self.newlines!r}")

    def select(self, view: View) -> Selection:
        """``(B, n)`` keep mask: the rows that are not visual, each crop's top patches by its ``(N,)``
        [CLS] row (``view.vision.raw.cls_attention[crop]``), and the newline rows unless dropped."""
        vision = view.vision
        patches = torch.zeros_like(view.visual)
        for b, crops in enumerate(vision.images):
            for cols, _ in crops:
                patches[b, cols[cols >= 0]] = True
        newlines = view.visual & ~patches  # visual rows that carry no patch: LLaVA-NeXT's row-end newlines
        keep = ~view.visual | newlines if self.newlines == "keep" else ~view.visual
        totals = kept_counts(view, 0, None, self.flops) if self.flops is not None else None
        for b, crops in enumerate(vision.images):
            if totals is None:
                counts = [round(self.keep * cols.numel()) for cols, _ in crops]
            else:
                paid = int(newlines[b].sum()) if self.newlines == "keep" else 0
                counts = split_budget(max(0, totals[b] - paid), [int((cols >= 0).sum()) for cols, _ in crops])
            for (cols, image), k in zip(crops, counts):
                score = vision.raw.cls_attention[image]
                if totals is not None:  # only patches that reach the LLM compete for the sample's count
                    score = score.masked_fill(cols < 0, float("-inf"))
                top = cols[score.topk(min(max(1, k), cols.numel())).indices]
                keep[b, top[top >= 0]] = True
        return Selection(keep=keep)
