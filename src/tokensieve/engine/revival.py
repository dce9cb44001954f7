"""Tokens chosen again at every pass, and the Aux Cache that revives them (LazyLLM).

A method that needs ``"aux cache"`` chooses, after each of its scoring layers and in every pass (the
prefill and each decode step), which tokens the following layers compute (:meth:`Method.choose`).
The engine keeps, per sample and per prompt token (and per token of any later pass of several tokens,
such as a question fed after its context; a token decoded alone is never pruned in its own pass and
has every layer's KV):

* its *depth*: the layers ``0 .. depth - 1`` whose KV it has; the KV cache of layer ``l`` holds exactly
  the tokens computed at layer ``l`` (a token leaves the hidden rows at the layer where it is pruned,
  so its KV exists for a prefix of the layers);
* its hidden state at the input of layer ``depth`` (the Aux Cache), where ``depth`` is below the
  number of layers.

In a decode step, a token chosen for layer ``l`` whose depth is ``l`` joins the hidden rows there from
the Aux Cache and goes through the layers while it stays chosen, so its KV is computed once per layer
and only for the layers it misses; tokens whose KV a layer holds are its keys without being computed.
A token pruned again leaves its new hidden state in the Aux Cache. Each layer's attention sees only
the tokens chosen for it (the mask hides the rest of its cache).

The scores read the last token's query against the layer's cached keys (one row, no key projection
recomputed); a pruning layer gathers the hidden rows once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import compat
from ..attention import attention_rows, cache_attention, take_rows
from ..ledger import Rows
from ..methods.base import RevivalView
from .state import EngineParts


@dataclass
class AuxCache:
    """What a pruned token needs to be computed later, and the tokens chosen in the present pass.

    Attributes:
        hidden: ``(B, T, d)`` hidden state of each prompt token (and each token of a later pass of several)
            at the input of layer ``depth`` (meaningful where ``depth`` is below the number of layers).
        depth: ``(B, T)`` long, the layers ``0 .. depth - 1`` whose KV each such token has.
        cos, sin: ``(..., B, T_total, head_dim)`` the rotary rows of every position seen so far.
        position_ids: ``(..., B, T_total)`` the position ids the model gave them, or None.
        chosen: ``(B, T_total)`` bool, the tokens the present layer of the present pass computes with.
        attended: per decoder layer, ``(B, T_total)`` bool: the tokens its attention saw in the latest pass.
    """

    hidden: torch.Tensor
    depth: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None
    chosen: torch.Tensor
    attended: list[torch.Tensor | None]


class Revival(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: the layer shim of methods needing ``"aux cache"``."""

    aux: AuxCache | None

    def _revival_layer(self, idx: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run layer ``idx`` on the rows it computes in this pass: the rows alive, and (decoding) the
        chosen tokens the Aux Cache holds at this depth; after it, choose the tokens of the next layer
        where it is a pruning layer."""
        state, ledger = self.state, self.ledger
        if idx == 0:
            self._revival_pass(hidden, kwargs)
        aux = self.aux
        if not state.prefill:
            hidden = self._revive(idx, hidden)
        rows = ledger.hidden
        aux.attended[idx] = aux.chosen.clone()
        if state.prefill:
            ledger.hidden_counts.append(self._real_counts(rows))
            ledger.visual_counts.append(ledger.is_visual(rows).sum(1))
        kwargs = self._revival_kwargs(idx, hidden, kwargs)
        out = original(hidden, *args, **kwargs)
        if state.cache is not None:
            self._track_cache(idx, state.cache, rows, hidden, kwargs)
        b, col = (rows.valid & (rows.pos < aux.depth.shape[1])).nonzero(as_tuple=True)
        aux.depth[b, rows.pos[b, col]] = idx + 1
        if idx + 1 in self.method.pruning_layers():
            out = self._choose_next(idx, hidden, out, rows, kwargs)
        return out

    def _revival_pass(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """At layer 0: a new Aux Cache at the prefill; every pass starts with every real token chosen, and
        the rotary rows of this pass's positions are recorded."""
        state, ledger = self.state, self.ledger
        cos, sin = kwargs["position_embeddings"]
        batch = hidden.shape[0]
        cos, sin = (t.expand(*t.shape[:-3], batch, *t.shape[-2:]) for t in (cos, sin))
        pids = kwargs.get("position_ids")
        if pids is not None:
            pids = pids.expand(*pids.shape[:-2], batch, pids.shape[-1])
        if state.prefill:
            n = ledger.prompt_length
            self.aux = AuxCache(
                hidden=hidden.new_empty(batch, n, hidden.shape[-1]),
                depth=torch.where(torch.arange(n, device=hidden.device) < state.offset, self.num_layers, 0)
                .expand(batch, n).clone(),
                cos=cos, sin=sin, position_ids=pids, chosen=ledger.real.clone(),
                attended=[None] * self.num_layers,
            )
            return
        aux = self.aux
        aux.cos, aux.sin = torch.cat([aux.cos, cos], -2), torch.cat([aux.sin, sin], -2)
        if aux.position_ids is not None and pids is not None:
            aux.position_ids = torch.cat([aux.position_ids, pids], -1)
        aux.chosen = ledger.real.clone()
        if state.new_tokens > 1:  # a pass of several tokens (a question fed after its context): they can be pruned
            self._grow(ledger.real.shape[1], state.offset)

    def _grow(self, total: int, start: int) -> None:
        """Extend the Aux Cache to ``total`` positions: those before ``start`` (tokens decoded one per
        pass, never pruned in their own pass) have every layer's KV; this pass's, from ``start``, none yet."""
        aux = self.aux
        batch, n, width = aux.hidden.shape
        if total <= n:
            return
        cols = torch.arange(n, total, device=aux.depth.device)
        depth = torch.where(cols < start, self.num_layers, 0).expand(batch, -1)
        aux.depth = torch.cat([aux.depth, depth], 1)
        aux.hidden = torch.cat([aux.hidden, aux.hidden.new_empty(batch, total - n, width)], 1)

    def _revive(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Add to the hidden rows the chosen tokens whose KV stops before layer ``idx``, from the Aux
        Cache; rows stay in position order (padding entries first), the newest token last."""
        ledger, aux = self.ledger, self.aux
        n = aux.depth.shape[1]
        rows = ledger.hidden
        alive = torch.zeros_like(aux.chosen, dtype=torch.long).scatter_add_(1, rows.pos, rows.valid.long()) > 0
        join = aux.chosen[:, :n] & (aux.depth == idx) & ~alive[:, :n]  # rows carried here have this depth too
        if not bool(join.any()):
            return hidden
        width = int(join.sum(1).max())
        cols = join.long().argsort(dim=1, stable=True)[:, n - width:]  # each sample's joiners last, ascending
        valid = join.gather(1, cols)
        pos = torch.cat([cols, rows.pos], 1)
        valid = torch.cat([valid, rows.valid], 1)
        states = torch.cat([aux.hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1])), hidden], 1)
        order = torch.where(valid, pos, -1).argsort(dim=1, stable=True)
        pos, valid = pos.gather(1, order), valid.gather(1, order)
        first = (~valid).sum(1, keepdim=True)  # padding entries copy the first real row (no empty rows)
        source = torch.where(valid, order, order.gather(1, first))
        pos = torch.where(valid, pos, pos.gather(1, first))
        ledger.hidden = Rows(pos, valid)
        self.state.version += 1
        return states.gather(1, source[..., None].expand(-1, -1, states.shape[-1]))

    def _revival_kwargs(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        """Layer ``idx``'s keyword arguments: the engine's own at the prefill and where the layer's whole
        cache is chosen for one new row; else the rows' rotary tables and a mask hiding the entries of
        the layer's cache that this pass did not choose."""
        state, ledger, aux = self.state, self.ledger, self.aux
        rows, held = ledger.hidden, ledger.caches[idx]
        if state.prefill or held is None:
            return self._layer_kwargs(idx, hidden, kwargs)
        held_chosen = aux.chosen.gather(1, held.pos)
        if rows.width == 1 and bool((held_chosen | ~held.valid).all()):
            return self._layer_kwargs(idx, hidden, kwargs)
        kw = dict(kwargs)
        kw["position_embeddings"] = (take_rows(aux.cos, rows.pos), take_rows(aux.sin, rows.pos))
        if aux.position_ids is not None:
            lead = aux.position_ids.shape[:-2]
            kw["position_ids"] = aux.position_ids.gather(-1, rows.pos.expand(*lead, -1, -1))
        keys = held.cat(rows)
        allowed = self._allowed(rows, keys) & torch.cat([held_chosen, rows.valid], 1)[:, None, :]
        kw["attention_mask"] = self._mask_tensor(allowed, kwargs.get("attention_mask"), hidden.dtype)
        return kw

    def _choose_next(self, idx: int, hidden: torch.Tensor, out: Any, rows: Rows, kwargs: dict) -> Any:
        """Let the method choose the tokens of layer ``idx + 1`` from those layer ``idx`` saw, by the last
        token's attention there; rows leaving go to the Aux Cache (their depth is ``idx + 1``).

        Args:
            hidden: ``(B, n, d)`` layer ``idx``'s input rows; ``out``: its output (rows, as the layer
                returns them: :func:`~tokensieve.compat.layer_output`); ``rows``: their positions;
                ``kwargs``: what the layer was called with.

        Returns:
            ``(B, n', d)`` the output rows the next layer computes, as the layer returns them.
        """
        state, ledger, aux = self.state, self.ledger, self.aux
        layer = self.adapter.layers[idx]
        output, out = out, compat.layer_hidden(out)
        cos, sin = kwargs["position_embeddings"]
        last = torch.full((rows.pos.shape[0], 1), rows.width - 1, dtype=torch.long, device=rows.pos.device)
        if state.cache is not None:
            entries = ledger.caches[idx]
        else:
            entries = rows
        candidate = entries.valid & aux.chosen.gather(1, entries.pos) & ledger.real.gather(1, entries.pos)
        is_last = entries.valid & (entries.pos == rows.pos[:, -1:])

        def attention() -> torch.Tensor:
            with torch.no_grad():
                if state.cache is not None:
                    probs = cache_attention(layer, hidden, cos, sin, last, state.cache.layers[idx].keys, candidate[:, None])
                else:
                    probs = attention_rows(layer, hidden, cos, sin, last, candidate[:, None])
            return probs[:, :, 0]

        view = RevivalView(idx, entries.pos, candidate, is_last, state.prefill, attention)
        keep = (self.method.choose(view) & candidate) | is_last
        chosen = torch.zeros_like(aux.chosen, dtype=torch.long).scatter_add_(1, entries.pos, keep.long()) > 0
        aux.chosen = chosen
        stay = rows.valid & (chosen.gather(1, rows.pos) | ~ledger.real.gather(1, rows.pos))  # padding stays, as unpruned
        if bool((stay == rows.valid).all()):
            return output
        leave = rows.valid & ~stay
        b, col = leave.nonzero(as_tuple=True)
        aux.hidden[b, rows.pos[b, col]] = out[b, col]
        new_rows, index = rows.select(stay)
        ledger.hidden = new_rows
        ledger.identity = False
        state.version += 1
        return compat.layer_output(layer, out.gather(1, index[..., None].expand(-1, -1, out.shape[-1])))
