"""Model adapters: one small class per supported family."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Layout
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, LlavaNextVideoAdapter, Qwen2VLAdapter, CausalLMAdapter)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family.

    Raises:
        TypeError: the model's class is not supported (the supported classes are listed).
    """
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.classes:
            return cls(model)
    supported = ", ".join(c for a in ADAPTERS for c in a.classes)
    raise TypeError(f"tokensieve has no adapter for {name}; supported model classes: {supported}")


__all__ = ["ADAPTERS", "Adapter", "Layout", "adapter_for"]
