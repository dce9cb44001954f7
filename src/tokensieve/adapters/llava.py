"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..compat import clip_transformer
from .base import Adapter, Layout, runs


class LlavaAdapter(Adapter):
    """LLaVA-1.5: each image is a square grid of patch tokens (the [CLS] token is dropped by the
    default feature-selection strategy, kept by ``"full"``, which then has no regular grid)."""

    family = "llava"
    classes = ("LlavaForConditionalGeneration",)

    def tokens_per_image(self) -> int:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        extra = 0 if self.model.config.vision_feature_select_strategy == "default" else 1
        return side * side + extra

    def vision_feature_layer(self) -> nn.Module:
        cfg = self.model.config
        tower = clip_transformer(self.model.model.vision_tower)
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int) or cfg.vision_feature_select_strategy != "default" \
                or not hasattr(getattr(tower, "embeddings", None), "class_embedding"):
            raise TypeError("this LLaVA's vision features are not one CLIP layer's patches after its [CLS] token "
                            f"(vision_feature_layer={layer!r}, strategy={cfg.vision_feature_select_strategy!r})")
        layers = tower.encoder.layers
        return layers[len(layers) + layer if layer < 0 else layer - 1]

    def vision_embeddings(self) -> nn.Module:
        self.vision_feature_layer()  # same checks
        return clip_transformer(self.model.model.vision_tower).embeddings

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def layout(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> Layout:
        visual = input_ids == self.model.config.image_token_id
        per_image = self.tokens_per_image()
        index = runs(visual, per_image)
        side = math.isqrt(per_image)
        grids: list[list[tuple[torch.Tensor, int, int]]] = []
        for b in range(input_ids.shape[0]):
            sample = []
            if side * side == per_image:
                for i in range(int(index[b].max().item()) + 1):
                    pos = (index[b] == i).nonzero().squeeze(1)
                    if pos.numel() == per_image:
                        sample.append((pos, side, side))
            grids.append(sample)
        return Layout(visual, index, grids)


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT (anyres): a base image plus crops with row-end newline tokens; counts vary per image
    and per sample. Visual positions come from the image token id; the layout is not a regular grid."""

    family = "llava-next"
    classes = ("LlavaNextForConditionalGeneration",)
    regular_grid = False
