"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..compat import clip_transformer
from ..shims import replace_method
from ..vision import Packing
from .base import Adapter, Layout, runs


class _ClipTower:
    """The CLIP tower of the LLaVA families: the encoder layer whose output (minus [CLS]) the projector
    receives, and the patch embeddings. ``self.model`` is the LLaVA model."""

    model: nn.Module

    def vision_feature_layer(self) -> nn.Module:
        cfg = self.model.config
        tower = clip_transformer(self.model.model.vision_tower)
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int) or cfg.vision_feature_select_strategy != "default" \
                or not hasattr(getattr(tower, "embeddings", None), "class_embedding"):
            raise TypeError(f"this {type(self.model).__name__}'s vision features are not one CLIP layer's patches "
                            f"after its [CLS] token (vision_feature_layer={layer!r}, "
                            f"strategy={cfg.vision_feature_select_strategy!r})")
        layers = tower.encoder.layers
        return layers[len(layers) + layer if layer < 0 else layer - 1]

    def vision_embeddings(self) -> nn.Module:
        self.vision_feature_layer()  # same checks
        return clip_transformer(self.model.model.vision_tower).embeddings


class LlavaAdapter(_ClipTower, Adapter):
    """LLaVA-1.5: each image is a square grid of patch tokens (the [CLS] token is dropped by the
    default feature-selection strategy, kept by ``"full"``, which then has no regular grid)."""

    family = "llava"
    classes = ("LlavaForConditionalGeneration",)

    def tokens_per_image(self) -> int:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        extra = 0 if self.model.config.vision_feature_select_strategy == "default" else 1
        return side * side + extra

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


class LlavaNextAdapter(_ClipTower, Adapter):
    """LLaVA-NeXT (anyres): a base image plus high-res crops with row-end newline tokens; counts vary per
    image and per sample. Visual positions come from the image token id; the layout is not a regular grid.

    Each image's crops (the base image, then the high-res crops row by row) go through the CLIP tower
    as one batch; ``LlavaNextModel.pack_image_features`` then gives the LLM the base image's patches in
    order, followed by the high-res crops arranged on one grid, unpadded to the image's aspect ratio,
    with an ``image_newline`` token after each of its rows. :meth:`packing` maps each crop's patches
    onto those tokens; :meth:`watch_packing` records it for every tower run, so that the vision tap
    can align per-crop signals also when ``generate()`` encodes the images before the first forward
    and passes no ``image_sizes`` to it (transformers 5.24; 5.2 passes them to the forward).
    """

    family = "llava-next"
    classes = ("LlavaNextForConditionalGeneration",)
    regular_grid = False

    def tokens_per_image(self) -> int:
        raise TypeError("LLaVA-NeXT's images have no fixed token count (a base image plus unpadded high-res "
                        "crops with row-end newlines); merging inside the vision tower is supported on "
                        "LlavaForConditionalGeneration")

    def packing(self, image_sizes: torch.Tensor) -> list[Packing]:
        """Where each image's crops land among its LLM tokens, read off the model's own packing.

        Patch indices, not features, go through ``pack_image_features`` (``image_newline`` becomes -1),
        so the map is the installed transformers' arrangement and unpadding by construction.

        Args:
            image_sizes: ``(I, 2)`` the ``(height, width)`` of each image, as the model receives them.

        Returns:
            per image, its :class:`Packing`: ``(crops, N)`` token offsets (base image first), -1 for
            patches unpadded away.
        """
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n = side * side
        sizes = torch.as_tensor(image_sizes).cpu()
        crops = [image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) for size in sizes.tolist()]
        ids = [torch.arange(k * n, dtype=torch.float32).view(k, n, 1) for k in crops]
        packed, _ = self.model.model.pack_image_features(ids, sizes, cfg.vision_feature_select_strategy,
                                                         image_newline=torch.full((1,), -1.0))
        out = []
        for k, tokens in zip(crops, packed):
            index = tokens[:, 0].long()
            patch = index >= 0
            offsets = torch.full((k * n,), -1, dtype=torch.long)
            offsets[index[patch]] = patch.nonzero().squeeze(1)
            out.append(Packing(offsets.view(k, n), tokens.shape[0]))
        return out

    def watch_packing(self, record: Callable[[list[Packing]], None]) -> Callable[[], None]:
        """Make this instance's ``get_image_features`` report, before each tower run, the :meth:`packing`
        of the images it encodes (through ``record``); returns the undo. The wrapper keeps the
        method's signature, which ``generate()`` inspects to pass it the image inputs."""
        base = self.model.model

        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            signature = inspect.signature(original)

            @functools.wraps(original)
            def get_image_features(*args: Any, **kwargs: Any) -> Any:
                record(self.packing(signature.bind(*args, **kwargs).arguments["image_sizes"]))
                return original(*args, **kwargs)

            return get_image_features

        return replace_method(base, "get_image_features", wrap)
