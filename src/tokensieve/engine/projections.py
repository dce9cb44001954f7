"""A layer's query and key projections, computed once for the layer and the attention rows a method reads.

A method that ranks tokens by layer ``l``'s attention needs ``l``'s projected queries and keys of the
alive rows, and so does layer ``l`` itself. Computing them twice costs a ``d x d`` projection per row
(a twelfth of a Llama-7B layer for the keys alone). Instead, on each attention layer the engine routes
``self_attn.q_proj`` and ``self_attn.k_proj`` through a shim that, during a prefill:

* records its output when it is called on all the alive rows (``(B, n, out)``, in row order), with the
  :class:`~tokensieve.ledger.Rows` it was computed for; the attention rows of a point after layer ``l``
  ran (FastV: layer ``K - 1``'s attention, tokens leave before ``K``) read the layer's own record;
* hands a record back instead of computing, when the layer runs on the very rows it was made for: the
  ranking at a point before layer ``l`` (PDrop, TransPrune: ``l``'s own attention; FitPrune inside
  ``l``) computes the projections first, and the record follows the rows a selection keeps
  (:meth:`_carry_projections`), so the layer does not compute them again.

A record is dropped once no point needs it, and whenever a selection rewrites the hidden states
(merging): the layer must then project what it receives.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ..ledger import Rows
from ..shims import shim_forward
from .state import EngineParts

PROJECTIONS = ("q_proj", "k_proj")


class Projections(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: recording and reusing q/k projections."""

    def _install_projections(self) -> list[Callable[[], None]]:
        """Shim the q/k projections of every layer whose attention a method reads; return the undos."""
        undo = []
        for idx in sorted(self.attention_layers):
            attn = self.adapter.layers[idx].self_attn
            for name in PROJECTIONS:
                undo.append(shim_forward(getattr(attn, name), functools.partial(self._projection, idx, name)))
        return undo

    def _projection(self, idx: int, name: str, original: Callable, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        state, ledger = self.state, self.ledger
        if state is None or ledger is None or not state.prefill or not self.selecting or args or kwargs:
            return original(x, *args, **kwargs)
        rows = ledger.hidden
        if x.dim() != 3 or x.shape[1] != rows.width:  # a few query rows, not the layer's input
            return original(x)
        held = state.projected.get((idx, name))
        if held is not None and held[0] is rows and held[1].shape[:2] == x.shape[:2]:
            return held[1]
        out = original(x)
        state.projected[(idx, name)] = (rows, out)
        return out

    def _projected(self, idx: int, name: str, rows: Rows) -> torch.Tensor | None:
        """``(B, n, out)`` layer ``idx``'s recorded ``name`` projection of ``rows``, or None."""
        held = self.state.projected.get((idx, name))
        return held[1] if held is not None and held[0] is rows else None

    def _carry_projections(self, idx: int, rows: Rows, new_rows: Rows | None, index: torch.Tensor | None,
                           rewritten: bool) -> None:
        """Layer ``idx``'s records of ``rows`` follow a selection at its input: gathered to ``new_rows``
        with ``index`` ``(B, m)``, kept as they are when nothing left, dropped when ``rewritten``."""
        projected = self.state.projected
        for name in PROJECTIONS:
            held = projected.get((idx, name))
            if held is None or held[0] is not rows:
                continue
            if rewritten:
                del projected[(idx, name)]
            elif new_rows is not None:
                out = held[1]
                projected[(idx, name)] = (new_rows, out.gather(1, index[..., None].expand(-1, -1, out.shape[-1])))

    def _forget_before(self, idx: int) -> None:
        """Drop what was saved for attention layers that no point at layer ``idx`` or later reads."""
        state = self.state
        for layer, last in self.last_reader.items():
            if last < idx:
                state.saved.pop(layer, None)
                for name in PROJECTIONS:
                    state.projected.pop((layer, name), None)
