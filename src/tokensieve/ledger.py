"""The token ledger: which original positions are alive, in the hidden states and in each layer's cache.

Every pruning decision in tokensieve is a "keep these rows" handed to the ledger. The ledger never
renumbers positions: a row is always identified by its original index in the unpruned sequence
(prompt positions ``0..T-1``, then one index per decoded token). Samples of a batch may keep different
numbers of rows; shorter samples are left-padded with *invalid* rows (a copy of a valid row's index,
flagged ``valid=False``) that the engine masks out as keys. Left padding keeps the last column the last
real token of every sample, which is what ``generate()`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rows:
    """A padded set of original positions per sample.

    Attributes:
        pos: ``(B, n)`` long, original positions, ascending within the valid entries of each row.
        valid: ``(B, n)`` bool, False for padding entries introduced by ragged selections.
    """

    pos: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def full(cls, batch: int, start: int, length: int, device: torch.device) -> "Rows":
        """All positions ``start..start+length-1`` for every sample."""
        pos = torch.arange(start, start + length, device=device).expand(batch, length).clone()
        return cls(pos, torch.ones(batch, length, dtype=torch.bool, device=device))

    @property
    def width(self) -> int:
        return self.pos.shape[1]

    def counts(self) -> list[int]:
        """Number of valid entries per sample."""
        return self.valid.sum(1).tolist()

    def cat(self, other: "Rows") -> "Rows":
        return Rows(torch.cat([self.pos, other.pos], 1), torch.cat([self.valid, other.valid], 1))

    def select(self, keep: torch.Tensor) -> tuple["Rows", torch.Tensor]:
        """Keep the entries where ``keep`` (``(B, n)`` bool) is True.

        Returns the new rows and ``index`` ``(B, m)``: for each new entry, the column of the old rows it
        comes from, so that any tensor aligned with the old rows can be gathered with it.
        """
        keep = keep & self.valid
        counts = keep.sum(1)
        width = int(counts.max().item()) if keep.numel() else 0
        batch = keep.shape[0]
        index = torch.zeros(batch, width, dtype=torch.long, device=keep.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
        for b in range(batch):
            cols = keep[b].nonzero().squeeze(1)
            k = cols.numel()
            if k == 0:
                raise ValueError(f"sample {b}: a selection removed every token")
            index[b, width - k :] = cols
            index[b, : width - k] = cols[0]
            valid[b, width - k :] = True
        return Rows(self.pos.gather(1, index), valid), index


@dataclass
class Ledger:
    """Alive original positions for one batch, from prefill through decoding.

    Attributes:
        hidden: rows of the hidden states currently flowing between decoder layers.
        caches: per decoder layer, the original positions held in that layer's KV cache.
        real: ``(B, T_total)`` bool, False where the 2-D attention mask marks padding.
        visual: ``(B, T)`` bool over prompt positions, True for visual tokens.
        image_index: ``(B, T)`` long, index of the image (per sample) a visual token belongs to, -1 elsewhere.
        prompt_length: T, the unpruned prompt length.
        length: the logical sequence length processed so far (prompt plus decoded tokens).
        identity: True while no hidden row has been removed in this prefill.
        shift: ``(B, T + 1)`` with renumbered positions: tokens removed before each prompt position
            (last column: removed in total), or None. It grows at each renumbering selection.
        shift_version: incremented each time ``shift`` changes.
        layer_shift: per decoder layer, ``(shift_version, (B, 1) tokens removed in total)`` as they
            were when the layer ran at prefill: a decoded token's position at that layer moves down
            by that many (a method that renumbers inside the LLM shifts it stage by stage).
        rope: per decoder layer, ``(B, m)`` the rotary position each cache entry's key is rotated at,
            kept only for methods that shift cache positions (StreamingLLM), else None.
        heads: per decoder layer, ``(B, H_kv, m)`` bool: the entries each KV head still attends to, where
            a method evicts per head (the cache holds their union); None where every head sees them all.
        memory: per decoder layer, ``(B, m, ...)`` a cache-stage method's per-entry state, aligned with
            the layer's cache entries (see :class:`~tokensieve.methods.base.CacheView`), or None.
        transitions: ``(B, T)`` accumulated token-transition scores per original position (TransPrune).
        hidden_counts, visual_counts: per decoder layer, ``(B,)`` real and visual tokens entering it at
            prefill (tensors: read once, at the end of the pass, so no device sync per layer).
        inside_counts: per layer that prunes inside itself, ``(B,)`` real tokens leaving its attention.
        visual_kept: stage name -> per sample, original positions of the visual tokens alive after it.
    """

    hidden: Rows
    caches: list[Rows | None]
    real: torch.Tensor
    visual: torch.Tensor
    image_index: torch.Tensor
    prompt_length: int
    length: int = 0
    identity: bool = True
    shift: torch.Tensor | None = None
    shift_version: int = 0
    layer_shift: list[tuple[int, torch.Tensor] | None] = field(default_factory=list)
    rope: list[torch.Tensor | None] = field(default_factory=list)
    memory: list[torch.Tensor | None] = field(default_factory=list)
    heads: list[torch.Tensor | None] = field(default_factory=list)
    transitions: torch.Tensor | None = None
    cache_identity: list[bool] = field(default_factory=list)
    hidden_counts: list[torch.Tensor] = field(default_factory=list)
    visual_counts: list[torch.Tensor] = field(default_factory=list)
    inside_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    visual_kept: dict[str, list[list[int]]] = field(default_factory=dict)

    def is_visual(self, rows: Rows) -> torch.Tensor:
        """``(B, n)`` bool: which entries of ``rows`` are valid visual tokens."""
        clamped = rows.pos.clamp(max=self.prompt_length - 1)
        return self.visual.gather(1, clamped) & rows.valid & (rows.pos < self.prompt_length)

    def record_visual(self, stage: str, rows: Rows) -> None:
        """Store the original positions of visual tokens alive in ``rows`` under ``stage``."""
        vis = self.is_visual(rows)
        self.visual_kept[stage] = [rows.pos[b][vis[b]].tolist() for b in range(rows.pos.shape[0])]
