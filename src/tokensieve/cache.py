"""A ``DynamicCache`` that reports the logical (unpruned) sequence length.

Pruned layers hold fewer entries than tokens processed; ``generate()`` and the mask utilities of
``transformers`` derive the next positions and the mask's key length from layer 0's cache. When a
method evicts entries of layer 0 those numbers would go wrong, so the engine turns the cache it is
given into a :class:`LedgerCache`, whose lengths are the number of tokens seen, whatever each layer
still holds. The engine builds every pruned layer's mask itself from the ledger.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from .attention import rotate
from .compat import mask_query_length


class LedgerCache(DynamicCache):
    """``DynamicCache`` whose reported lengths are logical, set by the engine after each forward."""

    logical_length: int = 0

    @classmethod
    def adopt(cls, cache: DynamicCache) -> "LedgerCache":
        """Turn an existing ``DynamicCache`` instance into a ``LedgerCache`` in place (same storage)."""
        if isinstance(cache, cls):
            return cache
        if type(cache) is not DynamicCache:
            raise TypeError(
                f"tokensieve needs a transformers.DynamicCache, got {type(cache).__name__}: call generate() "
                "without cache_implementation (or with cache_implementation='dynamic') and pass no cache "
                "of another class; generate() then creates a DynamicCache"
            )
        cache.__class__ = cls
        cache.logical_length = DynamicCache.get_seq_length(cache)
        return cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def get_mask_sizes(self, query: int | torch.Tensor, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for ``query`` new tokens (see :func:`~tokensieve.compat.mask_query_length`)."""
        return self.logical_length + mask_query_length(query), 0

    def stored_length(self, layer_idx: int) -> int:
        """Entries physically held by ``layer_idx`` (padding entries of ragged batches included)."""
        if layer_idx >= len(self.layers) or self.layers[layer_idx].keys is None:
            return 0
        return self.layers[layer_idx].keys.shape[-2]

    def gather(self, layer_idx: int, index: torch.Tensor) -> None:
        """Keep, per sample, the cache entries at columns ``index`` (``(B, m)`` long) of ``layer_idx``."""
        layer = self.layers[layer_idx]
        idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, idx.to(layer.keys.device))
        layer.values = layer.values.gather(2, idx.to(layer.values.device))

    def rotate_keys(self, layer_idx: int, delta: torch.Tensor, rotary: nn.Module, attn: nn.Module) -> None:
        """Move the rotary position of ``layer_idx``'s cached keys by ``delta`` (``(B, m)`` long, may be
        negative): rotating a key already rotated at ``p`` by the angle of ``delta`` gives the key at
        ``p + delta``, for rotary embeddings whose angle is linear in the position. Computed in fp32."""
        layer = self.layers[layer_idx]
        keys = layer.keys.float()
        cos, sin = rotary(keys, position_ids=delta.to(keys.device))
        scale = getattr(rotary, "attention_scaling", 1.0)  # the tables carry it; a pure rotation must not
        _, keys = rotate(keys, keys, cos.float() / scale, sin.float() / scale, attn)
        layer.keys = keys.to(layer.keys.dtype)
