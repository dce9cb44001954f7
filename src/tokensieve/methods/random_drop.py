"""Random visual-token dropping: the floor every method must beat.

Keeps a seeded uniform random ``keep`` fraction of each sample's visual tokens, either before the LLM
(``layer=0``, encoder stage) or at the input of decoder layer ``layer``. Text tokens are never dropped.
Positions: at the encoder stage ``positions`` as for every encoder method (``"auto"``, the default,
renumbers the shorter prompt except on M-RoPE models; ``"keep"``, ``"renumber"``); at a decoder layer
tokens keep their original positions (as FastV's release does), and ``positions`` must stay "auto".

Each sample draws its own mask, from a generator seeded with a hash (BLAKE2b) of ``seed`` and the
sample itself, so two samples keep different relative positions while a sample keeps the same tokens
alone or in any batch, with any padding:
    * always: the number of its real tokens and the offsets of its visual tokens from its first real
      token (its layout);
    * at the encoder stage (``layer=0``, the default): also the bytes of its text tokens' embeddings,
      which are plain lookups of its token ids and so identical in any batch: samples that differ in
      their text draw different masks.
At a decoder layer (``layer > 0``) the hidden states carry batch-dependent rounding, so only the layout
is hashed there: two samples with the same layout (prompt length and image place) draw the same mask.
(Hashing the token ids at every layer needs the engine to pass them in the ``View``.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import Method, Point, Selection, View, budget_keep, check_layer, kept_counts, layer_schedule, top_visual


def _tensor_bytes(x: torch.Tensor) -> bytes:
    x = x.detach().cpu().contiguous()
    return x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""


def sample_seed(seed: int, view: View, b: int, real: torch.Tensor | None = None) -> int:
    """The 63-bit seed of sample ``b`` of ``view``: a hash of ``seed`` and the sample (see the module doc).
    ``real``: ``view.query_valid("all")``, when the caller has it."""
    real = (view.query_valid("all") if real is None else real)[b]
    visual = view.visual[b]
    pos = view.positions[b]
    first = pos[real].min() if bool(real.any()) else pos.new_zeros(())
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(int(real.sum()).to_bytes(8, "little"))
    h.update(_tensor_bytes((pos[visual] - first).long()))
    if view.point.stage == "encoder":
        h.update(_tensor_bytes(view.hidden[b][real & ~visual]))
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


@dataclass
class RandomDrop(Method):
    """Options: ``keep`` fraction of visual tokens kept (default 0.5) or ``flops`` target ratio,
    ``layer`` (0 = before the LLM), ``seed``, ``positions`` (encoder stage)."""

    keep: float | None = None
    layer: int = 0
    seed: int = 0
    flops: float | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"

    name: ClassVar[str] = "random"
    stages: ClassVar[tuple[str, ...]] = ("encoder", "prefill")
    paper: ClassVar[str] = "baseline: uniform random token dropping"

    def validate(self) -> None:
        self.keep = budget_keep(self.keep, self.flops)
        if self.layer != 0 and self.positions != "auto":
            raise ValueError(f"positions={self.positions!r} applies to layer=0 (before the LLM); at layer "
                             f"{self.layer} kept tokens keep their original positions")

    def positions_mode(self) -> Literal["auto", "keep", "renumber"]:
        return self.positions if self.layer == 0 else "keep"

    def bind(self, num_layers: int) -> None:
        check_layer("layer", self.layer, num_layers)

    def points(self) -> list[Point]:
        return [Point(before=self.layer, stage="encoder" if self.layer == 0 else "prefill")]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        return layer_schedule(num_layers, n_visual, self.layer, self.keep)

    def select(self, view: View) -> Selection:
        scores = torch.zeros(view.visual.shape)
        visual = view.visual.cpu()
        real = view.query_valid("all")
        for b in range(scores.shape[0]):
            n = int(visual[b].sum())
            if n == 0:
                continue
            gen = torch.Generator().manual_seed(sample_seed(self.seed, view, b, real))
            scores[b, visual[b]] = torch.rand(n, generator=gen)
        scores = scores.to(view.hidden.device)
        return Selection(keep=top_visual(scores, view.visual, kept_counts(view, self.layer, self.keep, self.flops)))
