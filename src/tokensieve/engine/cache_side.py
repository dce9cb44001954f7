"""The cache side of a pass: which original positions each layer's cache holds, eviction, shifted positions."""

from __future__ import annotations

import torch

from ..cache import LedgerCache
from ..ledger import Rows
from ..methods.base import CacheView
from .state import EngineParts


class CacheSide(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: after each layer, record and evict its cache entries."""

    def _track_cache(self, idx: int, cache: LedgerCache, rows: Rows, position_ids: torch.Tensor | None) -> None:
        ledger, state = self.ledger, self.state
        held = ledger.caches[idx]
        ledger.caches[idx] = rows if held is None else held.cat(rows)
        if self.cache_shift:
            rope = rows.pos if position_ids is None else position_ids.expand(rows.pos.shape[0], -1)
            ledger.rope[idx] = rope if ledger.rope[idx] is None else torch.cat([ledger.rope[idx], rope], 1)
        if state.prefill:
            ledger.cache_identity[idx] = ledger.cache_identity[idx] and bool(rows.valid.all()) and rows.width == ledger.prompt_length - state.offset
        if cache.stored_length(idx) != ledger.caches[idx].width:
            raise RuntimeError(f"layer {idx}: cache holds {cache.stored_length(idx)} entries, the ledger {ledger.caches[idx].width}")
        if "cache" not in self.method.stages:
            return
        held = ledger.caches[idx]
        real = ledger.real.gather(1, held.pos) & held.valid
        keep = self.method.evict(CacheView(idx, held.pos, held.valid, real, state.offset + state.new_tokens))
        if keep is None or bool((keep == held.valid).all()):
            return
        new_rows, index = held.select(keep)
        cache.gather(idx, index)
        ledger.caches[idx] = new_rows
        ledger.cache_identity[idx] = False
        if self.cache_shift:
            self._shift_cache(idx, cache, new_rows, ledger.rope[idx].gather(1, index))

    def _shift_cache(self, idx: int, cache: LedgerCache, rows: Rows, rope: torch.Tensor) -> None:
        """Re-rotate layer ``idx``'s cached keys so that each real entry sits at its index among the
        sample's real entries (StreamingLLM's positions within the cache); ``rope`` ``(B, m)``: the
        positions they are rotated at now."""
        real = self.ledger.real.gather(1, rows.pos) & rows.valid
        target = torch.where(real, real.long().cumsum(1) - 1, rope)
        delta = target - rope
        self.ledger.rope[idx] = target
        if bool(delta.any()):
            cache.rotate_keys(idx, delta, self.adapter.rotary, self.adapter.layers[idx].self_attn)
