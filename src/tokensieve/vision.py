"""Signals from the vision tower, for encoder-stage methods: [CLS] attention, patch keys, features.

The tap hooks the vision encoder layer whose output the LLM receives (LLaVA-1.5's
``vision_feature_layer``, -2 by default) and, from that layer's own input, recomputes the one
attention row of the [CLS] query (norm, q/k projections, softmax over [CLS] and patches, mean over
heads), as FasterVLM and VisionZip read it, without switching the tower to eager attention. It also
keeps the patch keys (mean over heads, the ToMe / VisionZip similarity metric) and the patch
features the projector receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class VisionSignals:
    """Per image (flattened over the batch, in input order), for its N patch tokens.

    Attributes:
        cls_attention: ``(I, N)`` [CLS] -> patch attention, mean over heads.
        keys: ``(I, N, head_dim)`` patch keys, mean over heads.
        features: ``(I, N, d_vision)`` the patch features the projector receives.
        cls_features: ``(I, d_vision)`` the [CLS] token's feature at the same layer (VisionZip feeds it).
        attention: ``(I, 1 + N, 1 + N)`` the whole attention map, mean over heads ([CLS] first), when
            the tap was asked for it, else None.
        pixels: ``(I, C, H, W)`` the pixel values the tower received, when asked for, else None.
        patch: the tower's patch size in pixels.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    cls_features: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    patch: int = 0


@dataclass
class VisionTap:
    """Hooks on one CLIP encoder layer; ``signals`` holds the last forward's capture."""

    layer: nn.Module
    embeddings: nn.Module | None = None
    full: bool = False
    signals: VisionSignals | None = None
    _inputs: torch.Tensor | None = None
    _pixels: torch.Tensor | None = None
    _handles: list[Any] = field(default_factory=list)

    def install(self) -> Callable[[], None]:
        self._handles = [
            self.layer.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.layer.register_forward_hook(self._post),
        ]
        if self.full and self.embeddings is not None:
            self._handles.append(self.embeddings.register_forward_pre_hook(self._grab_pixels, with_kwargs=True))

        def remove() -> None:
            for h in self._handles:
                h.remove()

        return remove

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
        )
        self._inputs = self._pixels = None
