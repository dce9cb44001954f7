"""Training-time token dropping: teach the tiny LLaVA to answer from a pruned context.

Trained on full images only, the tiny model learns to lean on every visual token, background
included (counting collapses to about 0.35 whenever half the tokens go, whatever a method keeps).
Real VLMs, trained on far more varied images, are not that brittle. This augmentation shows the
model contexts like those pruning leaves, without favouring any pruning method: per batch, with
probability ``prob``, a start layer ``L`` is drawn uniformly from ``0..max_layer`` and a keep
fraction ``f`` uniformly from ``[min_keep, 1]``; each visual token outside the answers' evidence
is kept with probability ``f``, each evidence token with probability ``1 - evidence_drop (1 - f)``,
and one random evidence patch per evidence cell always stays (so every answer stays true). From
layer ``L`` on, the dropped tokens are masked out as keys: that is the same computation as
removing them after layer ``L - 1`` (before the model when ``L = 0``) with survivors keeping
their positions, which is what the intra-LLM pruning methods do.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .auxiliary import evidence_targets


def keep_one_per_cell(kept: torch.Tensor, on_evidence: torch.Tensor, cells: torch.Tensor,
                      generator: torch.Generator) -> None:
    """In place: mark one random evidence patch of every evidence cell as kept, so each object an
    answer depends on stays visible. ``kept``, ``on_evidence``: (N,) bool; ``cells``: (N,) cell of each patch."""
    for cell in cells[on_evidence].unique().tolist():
        patches = (on_evidence & (cells == cell)).nonzero().squeeze(1)
        kept[patches[torch.randint(0, len(patches), (), generator=generator)]] = True


@dataclass
class TokenDrop:
    """Sampler and applier of one training batch's token drop (see the module docstring)."""

    prob: float = 0.0
    max_layer: int = 5
    min_keep: float = 0.15
    evidence_drop: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0 or not 0.0 < self.min_keep <= 1.0 or not 0.0 <= self.evidence_drop <= 1.0:
            raise ValueError(f"token drop needs prob and evidence_drop in [0, 1] and min_keep in (0, 1], got "
                             f"{self.prob}, {self.evidence_drop} and {self.min_keep}")

    def sample(self, visual: torch.Tensor, patch_targets: torch.Tensor, evidence: torch.Tensor,
               generator: torch.Generator) -> tuple[int, torch.Tensor] | None:
        """Draw one batch's drop: ``None`` (no drop) or ``(start layer, keep)``.

        ``visual``: (B, T) bool, the visual tokens of each row (N per row); ``patch_targets``:
        (B, N, 4) per-patch classes (column 0: occupied, column 3: cell); ``evidence``: (Q, 3)
        rows of (batch row, query position, cell bits). ``keep``: (B, T) bool, False at dropped tokens.
        """
        if self.prob == 0.0 or torch.rand((), generator=generator).item() >= self.prob:
            return None
        layer = int(torch.randint(0, self.max_layer + 1, (), generator=generator))
        fraction = self.min_keep + (1.0 - self.min_keep) * torch.rand((), generator=generator).item()
        batch, n = patch_targets.shape[:2]
        bits = torch.zeros(batch, dtype=torch.long)
        for row, _, cell_bits in evidence.tolist():
            bits[row] |= cell_bits
        cells = patch_targets[..., 3]
        on_evidence = evidence_targets(patch_targets, torch.arange(batch), bits)  # (B, N)
        keep_prob = torch.where(on_evidence, 1.0 - self.evidence_drop * (1.0 - fraction), fraction)
        kept = torch.rand(batch, n, generator=generator) < keep_prob
        for row in range(batch):
            keep_one_per_cell(kept[row], on_evidence[row], cells[row], generator)
        keep = torch.ones_like(visual)
        keep[visual] = kept.reshape(-1)
        return layer, keep

    @staticmethod
    @contextmanager
    def applied(layers: nn.ModuleList, start: int, keep: torch.Tensor) -> Iterator[None]:
        """Within the block, decoder ``layers[start:]`` see no key where ``keep`` (B, T) is False
        (every token still sees itself, so no attention row is empty)."""

        length = keep.shape[1]
        allowed = keep[:, None, None, :] | torch.eye(length, dtype=torch.bool)[None, None]  # (B, 1, T, T)

        def mask_keys(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            mask = kwargs.get("attention_mask")
            if mask is None:
                kwargs["attention_mask"] = allowed.tril()
            elif mask.dtype == torch.bool:
                kwargs["attention_mask"] = mask & allowed
            else:
                kwargs["attention_mask"] = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
            return args, kwargs

        handles = [layer.register_forward_pre_hook(mask_keys, with_kwargs=True) for layer in layers[start:]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
