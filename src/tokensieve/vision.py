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
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor


@dataclass
class VisionTap:
    """Hooks on one CLIP encoder layer; ``signals`` holds the last forward's capture."""

    layer: nn.Module
    signals: VisionSignals | None = None
    _inputs: torch.Tensor | None = None
    _handles: list[Any] = field(default_factory=list)

    def install(self) -> Callable[[], None]:
        self._handles = [
            self.layer.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.layer.register_forward_hook(self._post),
        ]

        def remove() -> None:
            for h in self._handles:
                h.remove()

        return remove

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs = args[0] if args else kwargs["hidden_states"]

    @torch.no_grad()
    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        attn = module.self_attn
        x = module.layer_norm1(self._inputs)
        images, tokens, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).view(images, 1, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(images, tokens, heads, head_dim).transpose(1, 2)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (I, H, 1, 1+N)
        self.signals = VisionSignals(
            cls_attention=probs[:, :, 0, 1:].mean(1),
            keys=k[:, :, 1:].mean(1),
            features=out[:, 1:],
        )
        self._inputs = None
