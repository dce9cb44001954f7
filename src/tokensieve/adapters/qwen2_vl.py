"""Qwen2-VL and Qwen2.5-VL: merged patch tokens on a (t, h, w) grid with 3-D M-RoPE positions.

Kept tokens keep their original M-RoPE positions, because the engine gathers the model's own (cos, sin)
rows, computed from the 3-D position ids, for each kept original position.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat import mrope_position_ids
from .base import Adapter, Layout, runs


def grids_from_positions(index: torch.Tensor, positions: torch.Tensor) -> list[list[tuple[torch.Tensor, int, int]]]:
    """Each image's grid read from its tokens' M-RoPE (height, width) position ids, for calls that carry
    no ``image_grid_thw`` (``generate()`` encodes the images before the first forward on newer releases).

    Args:
        index: ``(B, T)`` image number per token, -1 elsewhere.
        positions: ``(3, B, T)`` temporal, height and width position ids.
    """
    grids: list[list[tuple[torch.Tensor, int, int]]] = []
    for b in range(index.shape[0]):
        sample = []
        for i in range(int(index[b].max().item()) + 1):
            pos = (index[b] == i).nonzero().squeeze(1)
            t, h, w = (positions[k, b, pos] for k in range(3))
            rows, cols = int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1
            if bool((t == t[0]).all()) and rows * cols == pos.numel():
                sample.append((pos, rows, cols))
        grids.append(sample)
    return grids


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
        if (input_ids == self.model.config.video_token_id).any():
            return Layout(visual, index, grids)
        thw = inputs.get("image_grid_thw")
        positions = mrope_position_ids(inputs.get("position_ids"))
        if thw is None and positions is not None:
            return Layout(visual, index, grids_from_positions(index, positions))
        is_image = input_ids == self.model.config.image_token_id
        if thw is not None:
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
