"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): each video frame goes through the CLIP
tower, its patch features are average-pooled (``vision_resampler``, ``spatial_pool_stride``) and
projected, and the frames' tokens follow one another, frame by frame, at the video token's positions.

Each frame is a square grid of ``(side // stride) ** 2`` tokens, so the layout numbers the frames as
images (``image_index``) with their grids: per-image methods (DivPrune, pooling, AIM) act per frame,
and prefill methods see every frame's tokens as visual. Images, which this family encodes as
LLaVA-NeXT's anyres crops, are visual tokens without a grid. Signals from inside the tower do not map
onto the pooled tokens one to one, so methods that read them ([CLS] attention, tower merging) are
refused with the base adapter's error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Adapter, Layout, runs

POOLED_FRAMES = ("LLaVA-NeXT-Video pools each frame's patches before the LLM, so a tower patch (and its [CLS] "
                 "attention) is not an LLM token; methods in or on the vision tower are supported on "
                 "LlavaForConditionalGeneration")


class LlavaNextVideoAdapter(Adapter):
    """Video frames as images on a pooled grid; see the module docstring."""

    family = "llava-next-video"
    classes = ("LlavaNextVideoForConditionalGeneration",)
    video = True

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def frame_side(self) -> int:
        """Tokens along each side of a frame's pooled grid."""
        cfg = self.model.config
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size) // cfg.spatial_pool_stride

    def tokens_per_image(self) -> int:
        raise TypeError(POOLED_FRAMES)

    def vision_feature_layer(self) -> nn.Module:
        raise TypeError(POOLED_FRAMES)

    def layout(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> Layout:
        cfg = self.model.config
        video = input_ids == cfg.video_token_id
        image = input_ids == cfg.image_token_id
        side = self.frame_side()
        frames = runs(video, side * side)
        images = runs(image)
        offset = frames.max(dim=1, keepdim=True).values.clamp(min=-1) + 1
        index = torch.where(image, images + offset, frames)
        grids: list[list[tuple[torch.Tensor, int, int]]] = []
        for b in range(input_ids.shape[0]):
            sample = []
            for i in range(int(frames[b].max().item()) + 1):
                pos = (frames[b] == i).nonzero().squeeze(1)
                if pos.numel() == side * side:
                    sample.append((pos, side, side))
            grids.append(sample)
        return Layout(video | image, index, grids)
