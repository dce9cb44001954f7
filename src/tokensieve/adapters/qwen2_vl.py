"""Qwen2-VL and Qwen2.5-VL: merged patch tokens on a (t, h, w) grid with 3-D M-RoPE positions.

Kept tokens keep their original M-RoPE positions, because the engine gathers the model's own (cos, sin)
rows, computed from the 3-D position ids, for each kept original position.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, Layout, runs


class Qwen2VLAdapter(Adapter):
    family = "qwen2-vl"
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    mrope = True

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def layout(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> Layout:
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for tok in self.image_token_ids:
            visual |= input_ids == tok
        index = runs(visual)
        grids: list[list[tuple[torch.Tensor, int, int]]] = [[] for _ in range(input_ids.shape[0])]
        thw = inputs.get("image_grid_thw")
        is_image = input_ids == self.model.config.image_token_id
        if thw is not None and not (input_ids == self.model.config.video_token_id).any():
            merge = self.model.config.vision_config.spatial_merge_size
            shapes = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
            k = 0
            for b in range(input_ids.shape[0]):
                pos = is_image[b].nonzero().squeeze(1)
                start = 0
                while start < pos.numel():
                    t, h, w = shapes[k]
                    k += 1
                    if t == 1:
                        grids[b].append((pos[start : start + h * w], h, w))
                    start += t * h * w
        return Layout(visual, index, grids)
