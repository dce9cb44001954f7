"""Signals from the vision tower, for encoder-stage methods: [CLS] attention, patch keys, features.

The tap hooks the vision encoder layer whose output the LLM receives (LLaVA-1.5's
``vision_feature_layer``, -2 by default) and, from that layer's own input, recomputes the one
attention row of the [CLS] query (norm, q/k projections, softmax over [CLS] and patches, mean over
heads), as FasterVLM and VisionZip read it, without switching the tower to eager attention. It also
keeps the patch keys (mean over heads, the ToMe / VisionZip similarity metric) and the patch
features the projector receives.

A model that feeds each image to its LLM as several crops (LLaVA-NeXT's anyres: a base image and
high-res crops, all run through the tower as one batch, then unpadded and packed with row-end newline
tokens) also tells the tap, for each run, where each crop's patches land among the image's tokens
(:class:`Packing`, recorded by the adapter's ``watch_packing``); :meth:`VisionTap.of` builds the tap a
method needs and refuses methods that do not declare ``"crops"`` on such a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .methods.base import Method


@dataclass
class Packing:
    """How one image's crops become its tokens in the LLM (LLaVA-NeXT's anyres packing).

    Attributes:
        offsets: ``(crops, N)`` long, for each crop (tower order: base image first) and each of its N
            patches (row-major), the patch's index among the image's tokens; -1 where the packing drops
            the patch (unpadding).
        tokens: the image's number of tokens in the LLM (its patches kept plus row-end newlines).
    """

    offsets: torch.Tensor
    tokens: int


PackingWatch = Callable[[Callable[[list[Packing]], None]], Callable[[], None]]


@dataclass
class VisionSignals:
    """Per image (flattened over the batch, in input order), for its N patch tokens. Where the model
    feeds an image as several crops, each crop is one "image" here (all crops in tower order).

    Attributes:
        cls_attention: ``(I, N)`` [CLS] -> patch attention, mean over heads.
        keys: ``(I, N, head_dim)`` patch keys, mean over heads.
        features: ``(I, N, d_vision)`` the patch features the projector receives.
        cls_features: ``(I, d_vision)`` the [CLS] token's feature at the same layer (VisionZip feeds it).
        attention: ``(I, 1 + N, 1 + N)`` the whole attention map, mean over heads ([CLS] first), when
            the tap was asked for it, else None.
        pixels: ``(I, C, H, W)`` the pixel values the tower received, when asked for, else None.
        patch: the tower's patch size in pixels.
        packing: per image of the run (not per crop), where its crops' patches land among its tokens,
            for models that pack crops (LLaVA-NeXT); None where each image's N patches are its tokens.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    cls_features: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    patch: int = 0
    packing: list[Packing] | None = None


@dataclass
class VisionTap:
    """Hooks on one CLIP encoder layer; ``signals`` holds the last forward's capture.

    ``watch``: the adapter's ``watch_packing`` for models that pack each image as several crops
    (installed with the hooks, it records each tower run's :class:`Packing`), else None.
    """

    layer: nn.Module
    embeddings: nn.Module | None = None
    full: bool = False
    watch: PackingWatch | None = None
    signals: VisionSignals | None = None
    _inputs: torch.Tensor | None = None
    _pixels: torch.Tensor | None = None
    _packing: list[Packing] | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def of(cls, adapter: Adapter, method: Method) -> VisionTap:
        """The tap ``method`` needs on ``adapter``'s vision tower: the whole attention map and the pixel
        values for ``"vision attention"``, the packing of each run where the model packs crops.

        Raises:
            TypeError: the model has no CLIP-style tower (from the adapter), or it packs each image as
                several crops and ``method`` does not declare ``"crops"`` in its ``needs``.
        """
        watch = getattr(adapter, "watch_packing", None)
        if watch is not None and "crops" not in method.needs:
            raise TypeError(f"{method.name} reads each image as one grid of patches; {type(adapter.model).__name__} "
                            "feeds an image as several crops (a base image and unpadded high-res crops with "
                            "row-end newlines), which it does not handle (supported: LlavaForConditionalGeneration)")
        full = "vision attention" in method.needs
        return cls(adapter.vision_feature_layer(), adapter.vision_embeddings() if full else None, full=full, watch=watch)

    def install(self) -> Callable[[], None]:
        self._undo = [
            self.layer.register_forward_pre_hook(self._pre, with_kwargs=True).remove,
            self.layer.register_forward_hook(self._post).remove,
        ]
        if self.full and self.embeddings is not None:
            self._undo.append(self.embeddings.register_forward_pre_hook(self._grab_pixels, with_kwargs=True).remove)
        if self.watch is not None:
            self._undo.append(self.watch(self._record_packing))

        def remove() -> None:
            while self._undo:
                self._undo.pop()()
            self._packing = None

        return remove

    def _record_packing(self, packing: list[Packing]) -> None:
        self._packing = packing

    def _grab_pixels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pixels = args[0] if args else kwargs["pixel_values"]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs = args[0] if args else kwargs["hidden_states"]

    @torch.no_grad()
    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        attn = module.self_attn
        x = module.layer_norm1(self._inputs)
        images, tokens, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        rows = tokens if self.full else 1
        q = attn.q_proj(x[:, :rows]).view(images, rows, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(images, tokens, heads, head_dim).transpose(1, 2)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (I, H, rows, 1+N)
        patch = getattr(getattr(self.embeddings, "patch_embedding", None), "kernel_size", (0,))[0]
        self.signals = VisionSignals(
            cls_attention=probs[:, :, 0, 1:].mean(1),
            keys=k[:, :, 1:].mean(1),
            features=out[:, 1:],
            cls_features=out[:, 0],
            attention=probs.mean(1) if self.full else None,
            pixels=self._pixels if self.full else None,
            patch=int(patch),
            packing=self._packing,
        )
        self._inputs = self._pixels = self._packing = None
