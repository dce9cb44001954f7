"""What the engine needs to know about a model family, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Layout:
    """Where the visual tokens of a batch are.

    Attributes:
        visual: ``(B, T)`` bool, True at visual-token positions.
        image_index: ``(B, T)`` long, per-sample image number of each visual token, -1 elsewhere.
        grids: per sample, ``(positions, rows, cols)`` of each image laid out as a regular grid
            (row-major original positions); empty for layouts that are not a regular grid.
    """

    visual: torch.Tensor
    image_index: torch.Tensor
    grids: list[list[tuple[torch.Tensor, int, int]]] = field(default_factory=list)


class Adapter:
    """Base adapter. Subclasses name the model classes they handle and where their parts are."""

    family: ClassVar[str]
    classes: ClassVar[tuple[str, ...]]
    mrope: ClassVar[bool] = False
    regular_grid: ClassVar[bool] = True  # each image's visual tokens form a rows x cols grid
    video: ClassVar[bool] = False  # the layout's grids are a video's frames, in time order

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (has ``layers``, ``rotary_emb``)."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def rotary(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """Token ids that mark visual positions in ``input_ids``; empty for text-only models."""
        return (self.model.config.image_token_id,)

    def vision_feature_layer(self) -> nn.Module:
        """The vision encoder layer whose output (minus [CLS]) the projector receives, for methods that
        read [CLS] attention or patch keys. Raises TypeError where the family has no such tower."""
        raise TypeError(f"{type(self.model).__name__} has no CLIP-style vision tower with a [CLS] token "
                        "feeding its LLM patch by patch (supported: LlavaForConditionalGeneration)")

    def vision_embeddings(self) -> nn.Module:
        """The vision tower's patch-embedding module (its input is the pixel values)."""
        raise TypeError(f"{type(self.model).__name__} has no CLIP-style vision embeddings")

    @property
    def projector(self) -> nn.Module:
        raise TypeError(f"{type(self.model).__name__} has no separate multimodal projector")

    def layout(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> Layout:
        """Visual positions of a batch, from the image token id(s), never from a prompt offset."""
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for tok in self.image_token_ids:
            visual |= input_ids == tok
        return Layout(visual, runs(visual), [[] for _ in range(input_ids.shape[0])])


def runs(visual: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Number the images of each sample: contiguous runs of visual tokens, cut every ``size`` tokens.

    Args:
        visual: ``(B, T)`` bool.
        size: tokens per image when images may sit back to back, or None.

    Returns:
        ``(B, T)`` long image index, -1 on non-visual positions.
    """
    index = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
    for b in range(visual.shape[0]):
        pos = visual[b].nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        new_run = torch.ones_like(pos, dtype=torch.bool)
        new_run[1:] = pos[1:] != pos[:-1] + 1
        run_id = new_run.long().cumsum(0) - 1
        if size is not None:
            offset = torch.arange(pos.numel(), device=pos.device)
            run_start = torch.zeros_like(pos)
            run_start[new_run] = offset[new_run]
            run_start = torch.cummax(run_start, 0).values
            within = offset - run_start
            chunks = within // size
            run_id = (run_id * 10_000 + chunks).unique(return_inverse=True)[1]
        index[b, pos] = run_id
    return index
