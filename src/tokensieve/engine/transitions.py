"""Token transitions accumulated over sublayers (TransPrune's TTV), from forward hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .state import EngineParts


class Transitions(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`."""

    def _transition(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Accumulate a sublayer's token transition (TransPrune's TTV) on the rows it processed:
        ||out|| / ||in|| times the softmax over the sample's tokens of 1 - cos(in, out), where ``in`` is
        the normed sublayer input and ``out`` its output before the residual add."""
        state, ledger = self.state, self.ledger
        if state is None or not state.prefill or ledger is None or not self.selecting:
            return
        before = args[0] if args else kwargs["hidden_states"]
        after = output[0] if isinstance(output, tuple) else output
        rows = ledger.hidden
        if before.shape[1] != rows.width or after.shape[1] != rows.width:
            return
        with torch.no_grad():
            b, a = before.float(), after.float()
            magnitude = a.norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-6)
            change = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
            real = ledger.real.gather(1, rows.pos) & rows.valid
            direction = torch.softmax(change.masked_fill(~real, float("-inf")), dim=-1).nan_to_num(0.0)
            ledger.transitions.scatter_add_(1, rows.pos, (magnitude * direction * real).to(ledger.transitions.dtype))
