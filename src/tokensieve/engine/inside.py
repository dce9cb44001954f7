"""Tokens that leave inside a decoder layer, after its attention (FitPrune)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import compat
from ..methods.base import Point
from .state import EngineParts


class InsideLayer(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: running a layer from its parts."""

    def _inside(self, idx: int, point: Point, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run layer ``idx`` with tokens leaving after its attention: every row is a query, key and value
        (and enters the cache), then only the kept rows go through the o-projection, residual and MLP.

        The layer is run as its parts (pre-norm attention block, then pre-norm MLP block), the structure
        shared by the Llama-family decoder layers of every supported model.
        """
        ledger = self.ledger
        rows = ledger.hidden
        keep = self._select(point, hidden, rows).keep & rows.valid
        if bool((keep == rows.valid).all()):
            ledger.record_visual(f"inside:{idx}", rows)
            return original(hidden, *args, **kwargs)
        layer = self.adapter.layers[idx]
        missing = [p for p in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp") if not hasattr(layer, p)]
        if missing or args:
            raise TypeError(f"pruning inside {type(layer).__name__} needs a pre-norm decoder layer called with keywords")
        new_rows, index = rows.select(keep)
        gather = index[..., None].expand(-1, -1, hidden.shape[-1])

        def rows_to_project(module: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            return (x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])),)

        handle = layer.self_attn.o_proj.register_forward_pre_hook(rows_to_project)
        try:
            attn_out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]
        finally:
            handle.remove()
        out = hidden.gather(1, gather) + attn_out
        out = out + layer.mlp(layer.post_attention_layernorm(out))
        ledger.hidden = new_rows
        self.state.version += 1
        ledger.identity = False
        ledger.inside_counts[idx] = self._real_counts(new_rows)
        ledger.record_visual(f"inside:{idx}", new_rows)
        return compat.layer_output(layer, out)
