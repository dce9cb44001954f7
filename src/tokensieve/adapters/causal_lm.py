"""Text-only decoders: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (cache-stage methods apply)."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class CausalLMAdapter(Adapter):
    family = "causal-lm"
    classes = ("LlamaForCausalLM", "Qwen2ForCausalLM")
    regular_grid = False

    @property
    def language_model(self) -> nn.Module:
        return self.model.model

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        return ()
