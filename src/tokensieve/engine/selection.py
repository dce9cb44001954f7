"""A method's view of the tokens alive at a point, its selection, and the ledger update that applies it."""

from __future__ import annotations

from typing import Callable

import torch

from ..attention import attention_rows, rotate, take_rows
from ..ledger import Rows
from ..methods.base import Grid, Point, Queries, View
from ..vision_align import align_vision
from .state import EngineParts


class Selecting(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: building a :class:`View` and applying a :class:`Selection`."""

    def _select(self, point: Point, hidden: torch.Tensor, rows: Rows):
        ledger = self.ledger
        view = View(
            point=point,
            hidden=hidden,
            positions=rows.pos,
            valid=rows.valid,
            visual=ledger.is_visual(rows),
            grids=self._grids(rows),
            visual_input=[len(v) for v in ledger.visual_kept["input"]],
            shape=self.shape,
            keys=lambda: self._keys(point),
            final_norm=self.adapter.language_model.norm,
            vision=(align_vision(self.vision_tap.signals, rows, ledger.image_index, self.method.name)
                    if self.vision_tap is not None else None),
            project=self._projector(),
            transitions=self.ledger.transitions.gather(1, rows.pos) if self.transition_layers else None,
            attention=lambda queries, temperature=1.0: self._attention(point, queries, temperature),
            query_valid=lambda queries: self._queries(rows, queries)[1],
        )
        if self.tower is not None:
            view = self.tower.view(view, self.ledger)
        return self.method.select(view)

    def _apply_point(self, point: Point, hidden: torch.Tensor) -> torch.Tensor:
        ledger = self.ledger
        rows = ledger.hidden
        selection = self._select(point, hidden, rows)
        if selection.hidden is not None:
            hidden = selection.hidden
        keep = selection.keep & rows.valid
        rewritten = selection.hidden is not None
        if bool((keep == rows.valid).all()):
            self._carry_projections(point.before, rows, None, None, rewritten)
            ledger.record_visual(f"{point.stage}:{point.before}", rows)
            return hidden
        new_rows, index = rows.select(keep)
        self._carry_projections(point.before, rows, new_rows, index, rewritten)
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        if self.renumber and point.stage in self.method.renumber_at:
            removed = torch.ones_like(ledger.real)
            removed.scatter_(1, new_rows.pos, False)
            removed &= ledger.real
            ledger.shift = removed.long().cumsum(1) - removed.long()
            ledger.shift = torch.cat([ledger.shift, removed.long().sum(1, keepdim=True)], 1)
            ledger.shift_version += 1
        ledger.hidden = new_rows
        self.state.version += 1
        ledger.identity = False
        ledger.record_visual(f"{point.stage}:{point.before}", new_rows)
        return hidden

    def _projector(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        try:
            return self.adapter.projector
        except TypeError:
            return None

    def _keys(self, point: Point) -> torch.Tensor:
        hidden, cos, sin, rows = self.state.saved[point.attention_layer]
        layer = self.adapter.layers[point.attention_layer]
        attn = layer.self_attn
        batch, n, _ = hidden.shape
        with torch.no_grad():
            k = self._projected(point.attention_layer, "k_proj", rows)
            if k is None:
                k = attn.k_proj(layer.input_layernorm(hidden))
            k = k.view(batch, n, -1, attn.head_dim).transpose(1, 2)
            rows_all = torch.arange(n, device=hidden.device).expand(batch, n)
            _, k = rotate(k, k, take_rows(cos, rows_all), take_rows(sin, rows_all), attn)
        return k.transpose(1, 2).reshape(batch, n, -1)

    def _grids(self, rows: Rows) -> list[list[Grid]]:
        out: list[list[Grid]] = []
        for b, grids in enumerate(self.grids):
            sample = []
            for positions, r, c in grids:
                cols = torch.searchsorted(rows.pos[b], positions.to(rows.pos.device), right=True) - 1
                if bool((rows.pos[b, cols.clamp(min=0)] == positions).all()):
                    sample.append(Grid(cols, r, c))
            out.append(sample)
        return out

    def _queries(self, rows: Rows, queries: Queries) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, q)`` row indices of the queries and ``(B, q)`` bool of which are real."""
        ledger = self.ledger
        real = ledger.real.gather(1, rows.pos) & rows.valid
        batch, n = rows.pos.shape
        cols = torch.arange(n, device=rows.pos.device).expand(batch, n)
        if queries == "last":  # each row's last real token, wherever the input was padded
            last = torch.where(real, cols, torch.zeros_like(cols)).max(1, keepdim=True).values
            return last, real.gather(1, last)
        if queries == "all":
            return cols, real
        vis = ledger.is_visual(rows)
        last_vis = torch.where(vis, cols, torch.full_like(cols, -1)).max(1, keepdim=True).values
        text = real & (cols > last_vis)
        if queries == "text":
            return cols, text
        if queries == "instruction":  # only those rows: each sample's text after its last image, in order
            width = max(1, int(text.sum(1).max()))
            order = torch.where(text, cols, cols + n).argsort(1)[:, :width]
            return order, text.gather(1, order)
        raise ValueError(f"unknown query set {queries!r}")

    def _attention(self, point: Point, queries: Queries, temperature: float = 1.0) -> torch.Tensor:
        state = self.state
        hidden, cos, sin, rows = state.saved[point.attention_layer]
        if rows is not self.ledger.hidden:
            raise RuntimeError("attention rows were saved for a different token set than the point's")
        qidx, _ = self._queries(rows, queries)
        allowed = self._allowed(rows, rows).gather(1, qidx[..., None].expand(-1, -1, rows.width))
        layer, at = self.adapter.layers[point.attention_layer], point.attention_layer
        with torch.no_grad():
            return attention_rows(layer, hidden, cos, sin, qidx, allowed, temperature,
                                  projected_q=self._projected(at, "q_proj", rows),
                                  projected_k=self._projected(at, "k_proj", rows))
