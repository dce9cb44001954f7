"""Training-only auxiliary heads that get the tiny LLaVA past its long plateau on 2 CPU cores.

Trained from scratch on the answer loss alone, the model learns the question prior long before
it learns to look (held-out accuracy stays at chance for 1000+ steps). Two extra signals,
used only during training, shape representations without touching the attention weights
directly (attention-based pruning methods are then judged on attention the model learnt itself):

- :class:`PatchProbe`: a linear probe on each projected visual token (the projector's output,
  which is what the LLM reads) must tell what lies under that token's 8x8 patch (colour,
  shape, glyph, or nothing) and which of the 3x3 cells the patch belongs to;
- :class:`EvidencePointer`: at a middle decoder layer, a bilinear scorer between the hidden
  state of the token that predicts an answer and the hidden states of the visual tokens must
  point at the patches of the objects the answer depends on.

Both heads are discarded after training; the shipped checkpoint is the stock model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..attention import attention_rows
from ..tasks.generators import COLOUR_NAMES
from ..tasks.glyphs import GLYPHS
from ..tasks.scene import BACKGROUND, CELL, GRID, SHAPES, Item

PATCH = 8
TARGETS: dict[str, int] = {
    "colour": 1 + len(COLOUR_NAMES) + 1,  # nothing, each colour, ink
    "shape": 1 + len(SHAPES) + 1,  # nothing, each shape, glyph
    "glyph": 1 + len(GLYPHS),  # nothing / not a glyph, each glyph
    "cell": GRID * GRID,
}
"""Classes of each per-patch target."""


def patch_targets(pixels: np.ndarray, items: tuple[Item, ...]) -> np.ndarray:
    """Per-patch class indices of one rendered image.

    ``pixels``: uint8 (H, W, 3); returns int64 (H/8 * W/8, 4): colour, shape, glyph and cell
    of each patch in row-major order. A patch is labelled with the item of its cell when any of
    its pixels differs from the background (items never leave their cell).
    """
    side = pixels.shape[0] // PATCH
    occupied = (pixels != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
    occupied = occupied.reshape(side, PATCH, side, PATCH).any(axis=(1, 3)).reshape(-1)
    rows, cols = np.divmod(np.arange(side * side), side)
    cells = (rows * PATCH // CELL) * GRID + cols * PATCH // CELL
    by_cell = {it.cell: it for it in items}
    out = np.zeros((side * side, len(TARGETS)), dtype=np.int64)
    out[:, 3] = cells
    for p in np.flatnonzero(occupied):
        item = by_cell[int(cells[p])]
        if item.glyph is not None:
            out[p, :3] = (len(COLOUR_NAMES) + 1, len(SHAPES) + 1, 1 + GLYPHS.index(item.glyph))
        else:
            out[p, :2] = (1 + COLOUR_NAMES.index(str(item.colour)), 1 + SHAPES.index(str(item.shape)))
    return out


def box_cells(boxes: list[tuple[int, int, int, int]]) -> tuple[int, ...]:
    """Grid cells (0..8, row-major) of pixel boxes (x0, y0, x1, y1)."""
    return tuple((y0 // CELL) * GRID + x0 // CELL for x0, y0, _, _ in boxes)


def cell_bits(cells: tuple[int, ...]) -> int:
    """Bit mask of a set of grid cells."""
    return sum(1 << c for c in set(cells))


class PatchProbe(nn.Module):
    """Linear heads on the projected visual tokens, trained with the model and then thrown away.

    Attach with :meth:`attach`; after each model forward, :meth:`loss` takes the targets
    (B, N, 4) and returns the mean cross-entropy over the four targets.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden_size, sum(TARGETS.values()))
        self.features: torch.Tensor | None = None

    def attach(self, projector: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Record the projector's output, (B * N, D) or (B, N, D), on every forward."""

        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.features = output

        return projector.register_forward_hook(record)

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the four per-patch targets; ``targets``: (B, N, 4) class indices."""
        if self.features is None:
            raise RuntimeError("PatchProbe.loss called before a forward pass through the projector")
        logits = self.head(self.features.reshape(-1, self.features.shape[-1]))
        flat = targets.reshape(-1, targets.shape[-1])
        losses = [
            nn.functional.cross_entropy(chunk, flat[:, k])
            for k, chunk in enumerate(logits.split(list(TARGETS.values()), dim=-1))
        ]
        self.features = None
        return torch.stack(losses).mean()


def evidence_targets(patch_targets: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """(Q, N) bool: the occupied patches inside each query's evidence cells.

    ``patch_targets``: (B, N, 4) per-patch classes; ``rows``: (Q,) batch row of each query;
    ``bits``: (Q,) evidence cell bit masks.
    """
    occupied = patch_targets[rows, :, 0] > 0
    in_cells = (bits[:, None] >> patch_targets[rows, :, 3]) & 1 == 1
    return occupied & in_cells


def evidence_nll(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-log`` of the probability mass on the target tokens, averaged over queries with a target.

    ``log_p``: (Q, N) log-probabilities of each query over the N visual tokens (they may sum to
    less than one when the distribution also covers text tokens); ``target``: (Q, N) bool.
    """
    keep = target.any(-1)
    return -log_p.masked_fill(~target, float("-inf"))[keep].logsumexp(-1).mean()


class EvidencePointer(nn.Module):
    """Bilinear pointer from an answer-predicting token to the visual tokens of its evidence.

    For query token hidden state ``h_q`` and visual hidden states ``h_v`` (144 per image) at
    one decoder layer, scores are ``(W_q h_q) . (W_k h_v) / sqrt(d)``; the loss is
    ``-log sum_{v in evidence} softmax(scores)_v`` averaged over answers, where the evidence
    is every occupied patch in the evidence cells.
    """

    def __init__(self, hidden_size: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, dim, bias=False)
        self.key = nn.Linear(hidden_size, dim, bias=False)
        self.scale = dim**-0.5

    def loss(self, hidden: torch.Tensor, visual: torch.Tensor, patch_targets: torch.Tensor,
             evidence: torch.Tensor) -> torch.Tensor:
        """``hidden``: (B, L, D) one layer's hidden states; ``visual``: (B, L) bool, exactly 144
        True per row; ``patch_targets``: (B, 144, 4); ``evidence``: (Q, 3) rows of
        (batch row, query position, cell bits). Returns a scalar."""
        batch, _, width = hidden.shape
        keys = self.key(hidden[visual].view(batch, -1, width))  # (B, N, d)
        rows, positions, bits = evidence.unbind(-1)
        queries = self.query(hidden[rows, positions])  # (Q, d)
        scores = torch.einsum("qd,qnd->qn", queries, keys[rows]) * self.scale
        return evidence_nll(scores.log_softmax(-1), evidence_targets(patch_targets, rows, bits))


def query_slots(rows: torch.Tensor, positions: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries scattered by batch row, so that one attention call per row serves all of its queries
    (keys are projected once per row): ``rows``, ``positions`` ``(N,)`` -> ``slot`` ``(N,)`` (each
    query's rank among its row's) and ``grid`` ``(batch, max per row)`` of positions (unused slots 0:
    they may attend to nothing and are never read)."""
    order = rows.argsort(stable=True)
    per_row = torch.bincount(rows, minlength=batch)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows)) - (per_row.cumsum(0) - per_row)[rows[order]]
    grid = torch.zeros(batch, int(per_row.max()), dtype=torch.long)
    grid[rows, slot] = positions
    return slot, grid


def evidence_head_loss(layer: nn.Module, head: int, hidden: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor,
                       patch_targets: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """Evidence loss on one head of a decoder layer's own attention (a grounding head).

    The attention of ``head`` at ``layer`` is recomputed for the answer-predicting tokens from
    the layer's input, over every key the model lets them see (causal and padding mask, text
    and visual); the loss is ``-log`` of its mass on the evidence patches. Unlike
    :class:`EvidencePointer`, this shapes the shipped model's attention at this one head, the
    way the grounding heads found in trained LLaVA models attend to the object a question names.

    ``hidden``: (B, L, D) input of ``layer``; ``cos``/``sin``: (B, L, head_dim) rotary tables;
    ``attention_mask``: (B, L); ``visual``: (B, L) bool, 144 True per row; ``patch_targets``:
    (B, 144, 4); ``evidence``: (Q, 3) rows of (batch row, query position, cell bits).
    """
    rows, positions, bits = evidence.unbind(-1)
    on_visual = visual_attention(layer, hidden, cos, sin, attention_mask, visual, rows, positions)[:, head]
    return evidence_nll(on_visual.log(), evidence_targets(patch_targets, rows, bits))


def attention_at(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 attention_mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(Q, H, L)``: every head's attention at ``layer`` from each query onto every position of its row,
    recomputed from the layer's input over every key the query may see (causal and padding mask; the
    others get 0).

    ``hidden``: (B, L, D) input of ``layer``; ``cos``/``sin``: (B, L, head_dim) rotary tables;
    ``attention_mask``: (B, L); ``rows``, ``positions``: (Q,) each query's batch row and position.
    """
    batch, length = attention_mask.shape
    slot, queries = query_slots(rows, positions, batch)
    allowed = torch.zeros(batch, queries.shape[1], length, dtype=torch.bool)
    allowed[rows, slot] = (torch.arange(length)[None] <= positions[:, None]) & attention_mask[rows].bool()
    probs = attention_rows(layer, hidden, cos, sin, queries, allowed)  # (B, H, slots, L)
    return probs[rows, :, slot]


def visual_attention(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attention_mask: torch.Tensor, visual: torch.Tensor, rows: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """``(Q, H, V)``: :func:`attention_at` on the visual tokens of each query's row only (``visual``:
    (B, L) bool, the same count ``V`` per row)."""
    per_query = attention_at(layer, hidden, cos, sin, attention_mask, rows, positions).transpose(1, 2)  # (Q, L, H)
    return per_query[visual[rows]].view(len(rows), -1, per_query.shape[-1]).transpose(1, 2)
