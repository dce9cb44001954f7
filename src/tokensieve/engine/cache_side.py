"""The cache side of a pass: which original positions each layer's cache holds, eviction, shifted positions."""

from __future__ import annotations

import torch

from ..attention import cache_attention
from ..cache import LedgerCache
from ..ledger import Rows
from ..methods.base import CacheView
from .state import EngineParts

QUERY_CHUNK = 256
"""Query rows per attention block when a method sums the attention each entry received: the whole
``(B, H, q, m)`` matrix of a long prefill never exists at once."""


class CacheSide(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: after each layer, record and evict its cache entries."""

    def _track_cache(self, idx: int, cache: LedgerCache, rows: Rows, hidden: torch.Tensor, kwargs: dict) -> None:
        """Record the entries layer ``idx`` appended for ``rows`` (its input ``hidden`` and keyword
        arguments ``kwargs`` in this pass), then let a cache-stage method evict."""
        ledger, state = self.ledger, self.state
        held = ledger.caches[idx]
        ledger.caches[idx] = rows if held is None else held.cat(rows)
        if self.cache_shift:
            pids = kwargs.get("position_ids")
            rope = rows.pos if pids is None else pids.expand(rows.pos.shape[0], -1)
            ledger.rope[idx] = rope if ledger.rope[idx] is None else torch.cat([ledger.rope[idx], rope], 1)
        if state.prefill:
            ledger.cache_identity[idx] = ledger.cache_identity[idx] and bool(rows.valid.all()) and rows.width == ledger.prompt_length - state.offset
        if cache.stored_length(idx) != ledger.caches[idx].width:
            raise RuntimeError(f"layer {idx}: cache holds {cache.stored_length(idx)} entries, the ledger {ledger.caches[idx].width}")
        if ledger.heads[idx] is not None:  # this pass's entries are seen by every head
            ledger.heads[idx] = torch.cat([ledger.heads[idx], rows.valid[:, None].expand(-1, ledger.heads[idx].shape[1], -1)], 2)
        if "cache" not in self.method.stages:
            return
        held = ledger.caches[idx]
        view = self._cache_view(idx, cache, held, rows, hidden, kwargs)
        keep = self.method.evict(view)
        ledger.memory[idx] = view.memory
        if keep is None:
            return
        keep, heads = self._per_head(idx, keep, held, cache)
        if heads is not None:
            ledger.cache_identity[idx] = False  # the layer's mask now differs per head
        if bool((keep == held.valid).all()):
            ledger.heads[idx] = heads
            return
        new_rows, index = held.select(keep)
        cache.gather(idx, index)
        ledger.caches[idx] = new_rows
        ledger.cache_identity[idx] = False
        ledger.heads[idx] = None if heads is None else heads.gather(2, index[:, None].expand(-1, heads.shape[1], -1)) \
            & new_rows.valid[:, None]
        if view.memory is not None:
            ledger.memory[idx] = view.memory.gather(1, index.view(*index.shape, *[1] * (view.memory.dim() - 2))
                                                    .expand(*index.shape, *view.memory.shape[2:]))
        if self.cache_shift:
            self._shift_cache(idx, cache, new_rows, ledger.rope[idx].gather(1, index))

    def _per_head(self, idx: int, keep: torch.Tensor, held: Rows, cache: LedgerCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A method's keep mask ``(B, m)``, or ``(B, H_kv, m)`` per KV head, as the entries the cache
        keeps (``(B, m)``: those some head still attends to) and the ``(B, H_kv, m)`` entries each head
        attends to (None where every head sees every entry kept)."""
        if keep.dim() == 2 and self.ledger.heads[idx] is None:
            return keep, None
        visible = self.ledger.heads[idx]
        if visible is None:
            visible = held.valid[:, None].expand(-1, cache.layers[idx].keys.shape[1], -1)
        heads = (keep[:, None] if keep.dim() == 2 else keep) & visible
        union = heads.any(1)
        return union, None if bool((heads == union[:, None]).all()) else heads

    def _per_head_allowed(self, allowed: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """``allowed`` ``(B, q, m)`` narrowed per query head to the entries its KV head attends to
        (``heads`` ``(B, H_kv, m)``; GQA groups share their KV head): ``(B, H, q, m)``."""
        query_heads = self.adapter.text_config.num_attention_heads
        return allowed[:, None] & heads.repeat_interleave(query_heads // heads.shape[1], dim=1)[:, :, None, :]

    def _cache_view(self, idx: int, cache: LedgerCache, held: Rows, rows: Rows, hidden: torch.Tensor,
                    kwargs: dict) -> CacheView:
        """Layer ``idx``'s entries ``held`` as a :class:`CacheView`; ``rows`` are this pass's rows."""
        ledger, state = self.ledger, self.state
        real = ledger.real.gather(1, held.pos) & held.valid
        heads = ledger.heads[idx]
        memory = ledger.memory[idx]
        if memory is not None and memory.shape[1] < held.width:
            pad = memory.new_zeros(memory.shape[0], held.width - memory.shape[1], *memory.shape[2:])
            memory = torch.cat([memory, pad], 1)

        def rows_attention(lo: int, hi: int) -> torch.Tensor:
            """``(B, H, hi - lo, m)``: this pass's query rows ``lo .. hi - 1`` over the entries held."""
            cols = torch.arange(lo, hi, device=rows.pos.device).expand(rows.pos.shape[0], -1)
            pos = rows.pos.gather(1, cols)
            query_real = (ledger.real.gather(1, pos) & rows.valid.gather(1, cols))
            allowed = self._allowed(Rows(pos, rows.valid.gather(1, cols)), held) & query_real[..., None]
            if heads is not None:  # (B, H, q, m): entries a head was evicted from are not its keys
                allowed = self._per_head_allowed(allowed, heads)
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                return cache_attention(self.adapter.layers[idx], hidden, cos, sin, cols, cache.layers[idx].keys, allowed)

        def attention(window: int | None = None) -> torch.Tensor:
            n = rows.width
            return rows_attention(n - min(window or n, n), n)

        def received(weights: torch.Tensor) -> torch.Tensor:
            total = None
            for lo in range(0, rows.width, QUERY_CHUNK):
                hi = min(rows.width, lo + QUERY_CHUNK)
                part = torch.matmul(weights[:, None, None, lo:hi].float(), rows_attention(lo, hi))[:, :, 0]
                total = part if total is None else total + part
            return total

        return CacheView(idx, held.pos, held.valid, real, state.offset + state.new_tokens, prefill=state.prefill,
                         new=rows.width, keys=lambda: cache.layers[idx].keys, values=lambda: cache.layers[idx].values,
                         attention=attention, received=received, memory=memory, heads=heads,
                         kv_heads=cache.layers[idx].keys.shape[1])

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
