"""LVPruning: learned decision modules between decoder layers drop the vision tokens the language does
not need.

Sun et al., "LVPruning: An Effective yet Simple Language-Guided Vision Token Pruning Approach for
Multi-modal Large Language Models", Findings of NAACL 2025 (arXiv 2501.13652); no public code.

Inference, before each module layer ``l`` (the paper: tokens removed by indexing, progressively):
    1. the module reads the hidden states entering layer ``l``: the visual tokens still alive as
       queries, the instruction's text tokens (after the last image) as keys and values
       (:mod:`tokensieve.learned.decision`), and gives each visual token keep/drop logits;
    2. ``decision="topk"`` (default): the ``round(keep[s] * N)`` visual tokens with the highest keep
       probability stay (``N`` the input's visual tokens; ``keep`` the cumulative fractions the modules
       were trained for, the same count per sample, so FLOPs are fixed); ``"threshold"``: those whose
       keep probability is above 0.5 (the deterministic form of the trained Gumbel decision; counts
       adapt to the sample), at least one;
    3. dropped tokens never come back; kept tokens keep their original positions.

Choices made here, where the paper's text was not available to us beyond its abstract and figure: the
module shape (see :mod:`tokensieve.learned.decision`), the top-k default (DynamicViT's inference rule,
which LVPruning's training follows), original positions, and, with ``flops``, the trained fractions
scaled by one factor to meet the budget. The modules are trained by ``tokensieve train-lvpruning``
(:mod:`tokensieve.learned.train_lvpruning`); ``weights`` names the file (default: the modules shipped
for the tiny LLaVA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

import torch

from .base import Method, Point, Selection, View, check_budget, top_visual
from .schedule import budget_scales

SHIPPED = Path(__file__).resolve().parent.parent / "learned" / "checkpoints" / "lvpruning_tiny.safetensors"
"""The decision modules trained for the shipped tiny LLaVA (``docs/tiny_model.md``)."""


@lru_cache(maxsize=8)
def _load(path: str, stamp: int) -> object:
    """The decision modules of ``path``, read once per file version (``stamp``: its modification time):
    a method is built for every ``prune()`` context, an evaluation builds one per batch."""
    from ..learned.decision import DecisionModules

    return DecisionModules.load(path)


@dataclass
class LVPruning(Method):
    """Options: ``weights`` (a file from ``tokensieve train-lvpruning``; default the tiny LLaVA's),
    ``keep`` (cumulative fractions per module; default the trained ones) or ``flops``, ``decision``."""

    weights: str | None = None
    keep: tuple[float, ...] | None = None
    flops: float | None = None
    decision: Literal["topk", "threshold"] = "topk"
    _modules: object = field(default=None, repr=False)
    _scales: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "lvpruning"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Sun et al., LVPruning: Language-Guided Vision Token Pruning for MLLMs, NAACL 2025 Findings"
    needs: ClassVar[tuple[str, ...]] = ("hidden states", "text tokens")

    def validate(self) -> None:
        check_budget(None, self.flops)
        if self.keep is not None and self.flops is not None:
            raise ValueError("give keep or flops, not both")
        if self.decision not in ("topk", "threshold"):
            raise ValueError(f"decision must be 'topk' or 'threshold', got {self.decision!r}")
        if self.decision == "threshold" and (self.keep is not None or self.flops is not None):
            raise ValueError("decision='threshold' keeps what the modules decide; keep and flops are top-k budgets")
        path = Path(self.weights or SHIPPED)
        self._modules = _load(str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else 0)
        config = self._modules.config
        if self.keep is not None:
            self.keep = tuple(float(k) for k in self.keep)
            if len(self.keep) != len(config.layers):
                raise ValueError(f"keep needs one fraction per module layer {config.layers}, got {self.keep}")
            if any(not 0 < k <= 1 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
                raise ValueError(f"keep fractions must be in (0, 1] and non-increasing, got {self.keep}")

    @property
    def layers(self) -> tuple[int, ...]:
        return self._modules.config.layers

    def fractions(self) -> tuple[float, ...]:
        return self.keep if self.keep is not None else self._modules.config.keep

    def bind(self, num_layers: int) -> None:
        if max(self.layers) >= num_layers:
            raise ValueError(f"the decision modules sit before layers {self.layers}; this model has {num_layers} layers")

    def points(self) -> list[Point]:
        return [Point(before=layer) for layer in self.layers]

    def _counts(self, n_visual: int, scale: float) -> list[int]:
        counts, n = [], n_visual
        for layer in range(self._modules.config.num_layers):
            if layer in self.layers:
                n = min(n, max(1, round(min(1.0, self.fractions()[self.layers.index(layer)] * scale) * n_visual)))
            counts.append(n)
        return counts

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        counts = self._counts(n_visual, 1.0)
        return counts, list(counts)

    @torch.no_grad()
    def select(self, view: View) -> Selection:
        config = self._modules.config
        if (view.shape.layers, view.shape.hidden) != (config.num_layers, config.hidden):
            raise ValueError(f"the decision modules were trained for a {config.num_layers}-layer model of hidden size "
                             f"{config.hidden}; this one has {view.shape.layers} layers of {view.shape.hidden}")
        stage = self.layers.index(view.point.before)
        if stage == 0:
            self._scales = {}
        module = self._modules.at(view.point.before).to(view.hidden.device)
        text = view.query_valid("text")
        keep_prob = torch.zeros(view.visual.shape, device=view.hidden.device)
        for b in range(view.hidden.shape[0]):
            vis, txt = view.visual[b].nonzero().squeeze(1), text[b].nonzero().squeeze(1)
            if vis.numel() == 0:
                continue
            if txt.numel() == 0:
                raise ValueError("lvpruning needs instruction text after the image: its modules attend over it")
            hidden = view.hidden[b].float()
            logits = module(hidden[vis][None], hidden[txt][None], torch.ones(1, txt.numel(), dtype=torch.bool,
                                                                             device=hidden.device))
            keep_prob[b, vis] = logits[0].softmax(-1)[:, 0]
        if self.decision == "threshold":
            decided = view.visual & (keep_prob > 0.5)
            counts = [max(1, int(decided[b].sum())) for b in range(decided.shape[0])]
            return Selection(keep=top_visual(keep_prob, view.visual, counts))
        scales = budget_scales(view, self.flops, self._scales, self._counts, f"lvpruning with modules at {self.layers}",
                               1 / min(self.fractions()))
        counts = [self._counts(n_in, c)[view.point.before] for c, n_in in zip(scales, view.visual_input)]
        return Selection(keep=top_visual(keep_prob, view.visual, counts))

    def report_options(self) -> dict:
        return {"weights": str(self.weights or SHIPPED.name), "keep": self.fractions(), "flops": self.flops,
                "decision": self.decision, "layers": self.layers}
