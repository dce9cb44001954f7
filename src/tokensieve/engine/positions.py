"""What each decoder layer receives for the rows alive: rotary tables, position ids, the 4-D mask."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import take_rows
from ..ledger import Rows
from .state import EngineParts


class PositionsAndMasks(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`: the keyword arguments of a shimmed layer."""

    def _layer_kwargs(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        state, ledger = self.state, self.ledger
        rows = ledger.hidden
        hidden_identity = ledger.identity or not state.prefill
        cache_rows = ledger.caches[idx]
        if hidden_identity and ledger.cache_identity[idx] and ledger.shift is None:
            return kwargs
        kw = dict(kwargs)
        key = ("rows", state.version, None if state.prefill else self._decode_positions_key(idx))
        if key not in state.memo:
            state.memo[key] = self._gather_positions(idx, rows, hidden, kwargs)
        kw["position_embeddings"], kw["position_ids"] = state.memo[key]
        keys = rows if cache_rows is None or not state.cache else cache_rows.cat(rows)
        heads = ledger.heads[idx] if keys is not rows else None
        mkey = ("mask", state.version, idx if keys is not rows else None)
        if mkey not in state.memo:
            if heads is None:
                state.memo[mkey] = self._mask(rows, keys, kwargs.get("attention_mask"), hidden.dtype)
            else:  # (B, H, n, m): each query head sees the cached entries its KV head kept, and this pass's
                visible = torch.cat([heads, rows.valid[:, None].expand(-1, heads.shape[1], -1)], 2)
                allowed = self._per_head_allowed(self._allowed(rows, keys), visible)
                state.memo[mkey] = self._mask_tensor(allowed, kwargs.get("attention_mask"), hidden.dtype)
        kw["attention_mask"] = state.memo[mkey]
        return kw

    def _decode_positions_key(self, idx: int) -> Any:
        """What a decoded token's positions at layer ``idx`` depend on beyond the pass (memo key part)."""
        if self.cache_shift:
            return ("cache", idx)
        entry = self.ledger.layer_shift[idx]
        return None if entry is None else entry[0]

    def _gather_positions(self, idx: int, rows: Rows, hidden: torch.Tensor, kwargs: dict):
        """Rotary tables and position ids of ``rows`` at layer ``idx``: the rows' own positions in
        prefill, less the tokens removed before them where positions are renumbered; while decoding,
        moved down by the tokens removed before layer ``idx`` at prefill, or (shifted cache positions)
        placed right after the entries layer ``idx``'s cache holds."""
        state, ledger = self.state, self.ledger
        cos, sin = kwargs["position_embeddings"]
        pids = kwargs.get("position_ids")
        batch = rows.pos.shape[0]
        if self.cache_shift and not state.prefill:
            held = ledger.caches[idx]
            count = (ledger.real.gather(1, held.pos) & held.valid).sum(1, keepdim=True)
            pids = count + torch.arange(rows.width, device=count.device)
            return self.adapter.rotary(hidden, position_ids=pids), pids
        if state.prefill and not ledger.identity:
            idx = rows.pos - state.offset
            cos, sin = take_rows(cos, idx), take_rows(sin, idx)
            if pids is not None:
                lead = pids.shape[:-2]
                full = pids.expand(*lead, batch, pids.shape[-1])
                pids = full.gather(-1, idx.expand(*lead, -1, -1))
        if ledger.shift is not None:
            if pids is None:
                raise ValueError("positions='renumber' needs position_ids from the model")
            pids = pids.expand(batch, -1)
            if state.prefill:
                shift = ledger.shift.gather(1, rows.pos.clamp(max=ledger.shift.shape[1] - 1))
            else:
                entry = ledger.layer_shift[idx]
                shift = entry[1] if entry is not None else 0
            pids = pids - shift
            cos, sin = self.adapter.rotary(hidden, position_ids=pids)
        return (cos, sin), pids

    def _mask(self, rows: Rows, keys: Rows, like: Any, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, n, m)`` mask of ``rows`` (queries) against ``keys``: causal in original positions,
        padding and ragged entries masked, each row allowed to see itself (no empty softmax rows).

        None where the model passed none (it lets SDPA apply causality itself) and the mask would add
        nothing: every entry valid and real, and either the rows are their own keys (prefill: ascending
        positions, so plain causality) or one query sees every key (a decode step); the attention
        backend then keeps its causal fast path."""
        if like is None and bool(keys.valid.all()) and bool(rows.valid.all()) \
                and bool(self.ledger.real.gather(1, keys.pos).all()) and (keys is rows or rows.width == 1):
            return None
        return self._mask_tensor(self._allowed(rows, keys), like, dtype)

    def _mask_tensor(self, allowed: torch.Tensor, like: Any, dtype: torch.dtype) -> torch.Tensor:
        """``allowed`` ``(B, n, m)`` (or ``(B, H, n, m)``, per query head) bool as the ``(B, 1 or H, n, m)``
        mask the layer takes: boolean, or additive (0 / dtype min) where the model passed a floating
        mask or runs eager attention."""
        allowed = allowed[:, None] if allowed.dim() == 3 else allowed
        floating = isinstance(like, torch.Tensor) and like.is_floating_point()
        if like is None:
            floating = getattr(self.adapter.text_config, "_attn_implementation", "sdpa") == "eager"
        if not floating:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def _allowed(self, rows: Rows, keys: Rows) -> torch.Tensor:
        qpos, kpos = rows.pos[:, :, None], keys.pos[:, None, :]
        real_k = self.ledger.real.gather(1, keys.pos)[:, None, :]
        return keys.valid[:, None, :] & ((real_k & (kpos <= qpos)) | (kpos == qpos))
