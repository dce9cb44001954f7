"""A KV cache stored in fixed-size blocks with a block table per sequence: the paged layout.

The layout is the one vLLM's PagedAttention uses (Kwon et al., "Efficient Memory Management for Large
Language Model Serving with PagedAttention", SOSP 2023): each layer owns a pool of physical blocks,
``keys`` and ``values`` tensors of shape ``(num_blocks, H_kv, block_size, D)``, and each sequence of
the batch a block table, the ids of the blocks holding its entries in order. A sequence's entries are
packed: entry ``i`` sits in block ``table[i // block_size]`` at slot ``i % block_size``, every block
full but the last. Freeing a block gives it back to the pool, whose next allocation reuses it, so a
method that evicts whole blocks (PagedEviction) holds a bounded number of blocks over a long decode.

Hugging Face attention calls ``cache.update(key_states, value_states, layer_idx, ...)`` and attends
over the ``(B, H_kv, m, D)`` tensors it returns. :class:`PagedLayer` writes the new entries into
blocks and returns a contiguous copy gathered from them: the transient price of running the stock
attention kernels (a paged kernel would read the blocks in place); the pool is the storage.

:class:`PagedCache` is a :class:`~tokensieve.cache.LedgerCache`: the engine uses it through the same
interface (logical lengths, ``stored_length``, ``gather``, ``rotate_keys``, ``layers[i].keys``).
"""

from __future__ import annotations

import heapq

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .cache import LedgerCache


class BlockPool:
    """One layer's physical storage: ``keys`` ``(N, H_kv, block_size, D)``, ``values`` likewise, and the
    ids of the free blocks (a min-heap: the lowest free id is taken first).

    The pool grows by exactly the blocks missing when none is free (one copy of the pool per block
    added; PagedAttention preallocates its pool instead), and :meth:`compact` gives capacity back."""

    def __init__(self, block_size: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys = key_states.new_zeros(0, key_states.shape[1], block_size, key_states.shape[-1])
        self.values = value_states.new_zeros(0, value_states.shape[1], block_size, value_states.shape[-1])
        self.free: list[int] = []

    @property
    def capacity(self) -> int:
        """Blocks allocated in memory, held or free."""
        return self.keys.shape[0]

    def nbytes(self) -> int:
        """Bytes of the pool's key and value tensors."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def take(self, count: int) -> list[int]:
        """``count`` free block ids, the lowest first; the pool grows if fewer are free."""
        missing = count - len(self.free)
        if missing > 0:
            start = self.capacity
            self.keys = torch.cat([self.keys, self.keys.new_zeros(missing, *self.keys.shape[1:])])
            self.values = torch.cat([self.values, self.values.new_zeros(missing, *self.values.shape[1:])])
            for block in range(start, start + missing):
                heapq.heappush(self.free, block)
        return [heapq.heappop(self.free) for _ in range(count)]

    def give(self, blocks: list[int]) -> None:
        """Return ``blocks`` to the free list."""
        for block in blocks:
            heapq.heappush(self.free, block)

    def compact(self, tables: list[list[int]]) -> list[list[int]]:
        """Renumber the blocks of ``tables`` to ``0..n-1`` (one copy of them) and release every other
        block from memory; returns the renumbered tables."""
        held = [block for table in tables for block in table]
        order = torch.tensor(held, dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys[order], self.values[order]
        self.free = []
        new_id = {block: i for i, block in enumerate(held)}
        return [[new_id[block] for block in table] for table in tables]


class PagedLayer(DynamicLayer):
    """One decoder layer's paged KV cache: a :class:`BlockPool`, and per sequence ``b`` its block table
    ``tables[b]`` and its number of entries ``lengths[b]``.

    ``keys`` / ``values`` are ``(B, H_kv, m, D)`` copies gathered from the blocks, ``m`` the longest
    sequence; a shorter sequence is left-padded with copies of its first entry (the engine's padding
    entries, left by ragged evictions and hidden by the attention mask: they occupy no block; the pad
    tokens of a left-padded prompt are entries until a selection drops them). Assigning a tensor of
    that layout writes its entry columns back into the blocks (how ``LedgerCache.rotate_keys``
    re-rotates keys); ``DynamicLayer`` operations that change the layout (``crop``, beam reordering,
    batch expansion) are not supported.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.pool: BlockPool | None = None
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        self.copied = 0  # entries moved between blocks by keep(); freeing whole blocks moves none
        self.is_initialized = False
        self._columns: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.pool = BlockPool(self.block_size, key_states, value_states)
        self.tables = [[] for _ in range(key_states.shape[0])]
        self.lengths = [0] * key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``(B, H_kv, n, D)`` to every sequence, taking blocks
        from the pool as its last one fills; returns the gathered ``(B, H_kv, m, D)`` keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, new, _ = key_states.shape
        if batch != len(self.tables):
            raise ValueError(f"this paged cache holds {len(self.tables)} sequences, the model passed {batch}")
        for b, n in enumerate(self.lengths):
            missing = -(-(n + new) // self.block_size) - len(self.tables[b])
            if missing > 0:
                self.tables[b] += self.pool.take(missing)
        entries = torch.tensor(self.lengths, device=self.device)[:, None] + torch.arange(new, device=self.device)
        self.lengths = [n + new for n in self.lengths]
        self._columns = None
        blocks, slots = self._locate(entries)
        for pool, states in ((self.pool.keys, key_states), (self.pool.values, value_states)):
            pool[blocks.flatten(), :, slots.flatten()] = states.transpose(1, 2).flatten(0, 1)
        return self.keys, self.values

    def stored(self) -> int:
        """``m``: columns of the gathered view (the longest sequence's entries)."""
        return max(self.lengths, default=0)

    def get_seq_length(self) -> int:
        return self.stored()

    def held_blocks(self) -> int:
        """Blocks in the sequences' tables (taken from the pool and not freed)."""
        return sum(len(table) for table in self.tables)

    def padding(self) -> list[int]:
        """Per sequence, the left padding columns of the gathered view."""
        m = self.stored()
        return [m - n for n in self.lengths]

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.pool is None else self._read(self.pool.keys)

    @keys.setter
    def keys(self, states: torch.Tensor) -> None:
        self._write_back(self.pool.keys, states)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.pool is None else self._read(self.pool.values)

    @values.setter
    def values(self, states: torch.Tensor) -> None:
        self._write_back(self.pool.values, states)

    def keep(self, kept: list[list[int]]) -> None:
        """Keep, of each sequence ``b``, the entries ``kept[b]`` (indices among its entries, ascending),
        packed in order again.

        A new block whose entries are one old block's entries from slot 0 on, in order (every block
        before, after and between whole evicted blocks; the kept prefix of a block that becomes the
        last) is that old block, not copied. A block none of whose entries stay goes back to the pool.
        The other kept entries, those of partly kept blocks and the ones after them until the count
        meets a block boundary again, are copied into blocks (the sequence's own freed ones first):
        all read before any is written. The pool is then compacted if more blocks are free than there
        are sequences: a decode eviction frees one block per sequence, which its next block reuses; a
        token-level eviction (the prefill's) frees more, and that memory is given back."""
        size = self.block_size
        sources: list[tuple[int, int]] = []
        targets: list[tuple[int, int]] = []
        for b, entries in enumerate(kept):
            old = self.tables[b]
            intact = {}
            for q in range(0, len(entries), size):
                run = entries[q: q + size]
                if run[0] % size == 0 and run[-1] - run[0] == len(run) - 1:
                    intact[q // size] = old[run[0] // size]
            spare = [block for block in old if block not in intact.values()]
            table = []
            for q in range(0, len(entries), size):
                if q // size in intact:
                    table.append(intact[q // size])
                    continue
                target = spare.pop(0) if spare else self.pool.take(1)[0]
                table.append(target)
                for t in range(q, min(q + size, len(entries))):
                    sources.append((old[entries[t] // size], entries[t] % size))
                    targets.append((target, t % size))
            self.pool.give(spare)
            self.tables[b], self.lengths[b] = table, len(entries)
        if sources:
            src = torch.tensor(sources, device=self.device).T
            dst = torch.tensor(targets, device=self.device).T
            for pool in (self.pool.keys, self.pool.values):
                pool[dst[0], :, dst[1]] = pool[src[0], :, src[1]]
            self.copied += len(sources)
        if len(self.pool.free) > len(self.tables):
            self.tables = self.pool.compact(self.tables)
        self._columns = None

    def _locate(self, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block id and slot, each ``(B, n)`` long, of each sequence's entries ``entries`` ``(B, n)``."""
        width = max(len(table) for table in self.tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.long, device=self.device)
        return table.gather(1, entries // self.block_size), entries % self.block_size

    def _view_columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(blocks, slots, is_entry)``, each ``(B, m)``: where each column of the view is read from
        (a padding column reads its sequence's first entry), and which columns are entries."""
        if self._columns is None:
            m = self.stored()
            pad = torch.tensor(self.padding(), device=self.device)[:, None]
            entries = torch.arange(m, device=self.device) - pad
            blocks, slots = self._locate(entries.clamp(min=0))
            self._columns = (blocks, slots, entries >= 0)
        return self._columns

    def _read(self, pool: torch.Tensor) -> torch.Tensor:
        blocks, slots, _ = self._view_columns()
        heads = torch.arange(pool.shape[1], device=pool.device)
        return pool[blocks[:, None, :], heads[None, :, None], slots[:, None, :]]

    def _write_back(self, pool: torch.Tensor, states: torch.Tensor) -> None:
        """Write the entry columns of ``states`` ``(B, H_kv, m, D)``, this layer's view layout, into ``pool``."""
        blocks, slots, is_entry = self._view_columns()
        if states.dim() != 4 or states.shape[0] != blocks.shape[0] or states.shape[2] != blocks.shape[1]:
            raise ValueError(f"a paged layer takes back (B, H_kv, m, D) = ({blocks.shape[0]}, H, {blocks.shape[1]}, D) "
                             f"tensors of its own layout, got {tuple(states.shape)}: crop, beam search and batch "
                             "expansion are not supported")
        pool[blocks[is_entry], :, slots[is_entry]] = states.transpose(1, 2)[is_entry].to(pool.dtype)


class PagedCache(LedgerCache):
    """A :class:`LedgerCache` whose layers are :class:`PagedLayer`: blocks of ``block_size`` entries.

    ``gather(layer_idx, index)`` keeps, per sample, the entries at columns ``index`` of the view with
    :meth:`PagedLayer.keep`: whole blocks are freed or kept in place, and only entries of partly kept
    blocks (and those after them up to a block boundary) are copied."""

    block_size: int

    def __init__(self, block_size: int, config=None) -> None:
        super().__init__(config=config)
        self._into_blocks(block_size)

    @classmethod
    def adopt(cls, cache: DynamicCache, block_size: int) -> PagedCache:
        """``cache`` as a :class:`PagedCache` of ``block_size``: a PagedCache as it is, an empty
        ``DynamicCache`` turned into one in place (``generate()`` creates one before the first pass).

        Raises:
            TypeError: not a DynamicCache (as :meth:`LedgerCache.adopt`).
            ValueError: a DynamicCache that already holds entries, or a PagedCache of another block size.
        """
        if isinstance(cache, cls):
            if cache.block_size != block_size:
                raise ValueError(f"this PagedCache has blocks of {cache.block_size} entries, the method {block_size}")
            return cache
        held = DynamicCache.get_seq_length(cache) if isinstance(cache, DynamicCache) else 0
        if held:  # refuse before adopting: the caller's cache stays as it was
            raise ValueError("a paged KV cache stores the entries in blocks from the first token: pass no cache, or "
                             f"an empty DynamicCache (this one holds {held} tokens)")
        cache = LedgerCache.adopt(cache)
        cache.__class__ = cls
        cache._into_blocks(block_size)
        return cache

    def _into_blocks(self, block_size: int) -> None:
        self.block_size = block_size
        self.layers = [PagedLayer(block_size) for _ in self.layers]
        self.layer_class_to_replicate = None  # update() adds PagedLayers itself

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(PagedLayer(self.block_size))
        return self.layers[layer_idx].update(key_states, value_states)

    def stored_length(self, layer_idx: int) -> int:
        return self.layers[layer_idx].stored() if layer_idx < len(self.layers) else 0

    def gather(self, layer_idx: int, index: torch.Tensor) -> None:
        """Keep, per sample, the entries at columns ``index`` (``(B, m)`` long) of the view: ascending,
        left-padded with copies of the first kept column (the layout :meth:`Rows.select` returns)."""
        layer = self.layers[layer_idx]
        kept = []
        for cols, pad in zip(index.tolist(), layer.padding()):
            entries = sorted({c - pad for c in cols if c >= pad})
            if cols[len(cols) - len(entries):] != [e + pad for e in entries]:
                raise ValueError("gather takes, per sample, ascending columns, left-padded with copies of the first")
            kept.append(entries)
        layer.keep(kept)

    def held_blocks(self) -> list[int]:
        """Per layer, the blocks its sequences hold."""
        return [layer.held_blocks() for layer in self.layers]

    def pool_blocks(self) -> list[int]:
        """Per layer, the blocks its pool has in memory (held or free)."""
        return [layer.pool.capacity if layer.pool is not None else 0 for layer in self.layers]

    def stored_bytes(self) -> int:
        """Bytes of every layer's pool: what the cache occupies, free blocks included."""
        return sum(layer.pool.nbytes() for layer in self.layers if layer.pool is not None)
