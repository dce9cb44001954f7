"""Differentiable keep weights on a frozen decoder's visual keys, for training pruning modules.

At chosen decoder layers a training rule (LVPruning's decision modules, ATP's thresholds) gives each
visual token a keep weight ``w`` in [0, 1]; a token's weight is the product of its decisions so far,
so a token dropped at one layer stays dropped. From the first such layer on, ``log(w + 1e-6)`` is added
to the attention scores of each visual key column: attention becomes ``exp(a) w / sum exp(a) w``
(DynamicViT's masked softmax, Rao et al., NeurIPS 2021; raoyongming/DynamicViT ``softmax_with_policy``),
gradients reach the weights, and every token still sees itself. The host model's weights stay frozen.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

EPS = 1e-6


@dataclass
class LayerInput:
    """What a training rule sees before decoder layer ``index``.

    Attributes:
        index: the layer about to run.
        hidden: ``(B, L, d)`` its input hidden states.
        previous: the previous layer's input (``(B, L, d)``) and keyword arguments (rotary
            ``position_embeddings`` among them), captured when a rule sits at ``index``.
        bias: ``(B, 1, L, L)`` the additive attention mask in force so far (causal, padding, keep weights).
        allowed: ``(B, L, L)`` bool, causal and padding.
        policy: ``(B, N)`` the visual tokens' keep weights so far.
        visual: ``(B, N)`` long, the rows of each sample's visual tokens.
    """

    index: int
    hidden: torch.Tensor
    previous: tuple[torch.Tensor, dict] | None
    bias: torch.Tensor
    allowed: torch.Tensor
    policy: torch.Tensor
    visual: torch.Tensor


Rule = Callable[[LayerInput], torch.Tensor]
"""A training rule: the ``(B, N)`` keep weights of this layer's decision (multiplied into the policy)."""


class KeyMasks:
    """Apply ``rule`` before each layer of ``at`` within a block. ``kept[s]``: ``(B,)`` mean keep weight of
    the visual tokens after decision ``s``."""

    def __init__(self, at: tuple[int, ...], rule: Rule) -> None:
        self.at, self.rule = at, rule
        self.kept: list[torch.Tensor] = []

    @contextmanager
    def applied(self, layers: torch.nn.ModuleList, visual: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
        """Within the block the decoder ``layers`` see the decisions. ``visual``: ``(B, N)`` long rows of
        the visual tokens; ``attention_mask``: ``(B, L)`` the batch's padding mask."""
        length = attention_mask.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        base = torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)[:, None]  # (B, 1, L, L)
        eye = torch.eye(length, dtype=torch.bool)[None, None]
        state: dict[str, Any] = {"policy": torch.ones(visual.shape), "mask": base, "previous": None}
        self.kept.clear()

        def hook(index: int):
            def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                hidden = args[0] if args else kwargs["hidden_states"]
                if index in self.at:
                    seen = LayerInput(index, hidden, state["previous"], state["mask"], allowed, state["policy"], visual)
                    state["policy"] = state["policy"] * self.rule(seen)
                    self.kept.append(state["policy"].mean(1))
                    weight = torch.ones(visual.shape[0], length).scatter(1, visual, state["policy"])
                    state["mask"] = base + torch.where(eye, 0.0, torch.log(weight + EPS)[:, None, None, :])
                if index + 1 in self.at:
                    state["previous"] = (hidden, kwargs)
                if index >= self.at[0]:
                    kwargs["attention_mask"] = state["mask"]
                return args, kwargs
            return pre

        first = max(0, self.at[0] - 1)
        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
                   for i, layer in list(enumerate(layers))[first:]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
