"""ATP: adaptive token pruning between decoder layers, counts chosen per instance and per layer by
learned thresholds over attention scores, plus spatially sampled tokens (SAP).

Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025 (arXiv
2412.00447; project page yxxxb.github.io/ATP-LLaVA-page); no public code. Only the paper's abstract,
project page and third-party summaries were available to us; the equation structure follows the one
public reimplementation (Sneha421/AI6103-ATP-LLaVA, ``llava/model/atp_module.py``, not the authors'),
corrected where it contradicts the summaries. Each module, between layer ``l`` and ``l + 1``:

    1. attention of layer ``l`` (head mean, softmax), over the tokens alive there:
       S_self(j)  = attention visual token ``j`` receives from the visual queries that may see it
                    (``i >= j``; including itself), averaged over them;
       S_cross(j) = attention it receives from the instruction (the text after the last image),
                    averaged over the instruction tokens;
       each divided by its mean over the alive visual tokens; S_red = (S_self + S_cross) / 2;
    2. SAP: grid cells at stride ``round(sqrt(1 / R_s))`` of each image's grid (``R_s = 0.25``: every
       second row and column) score ``S_sp = max(0, 1 - R_s * lambda_sample)``, ``lambda_sample = 3``;
       other tokens have no spatial score;
    3. the module's head (:mod:`tokensieve.learned.atp_heads`) reads the visual self-attention share,
       the instruction's attention share on the visual tokens and the alive fraction, and gives the
       thresholds ``theta_r``, ``theta_s``;
    4. a visual token stays if ``S_red > theta_r`` or ``S_sp > theta_s`` (at least one token); dropped
       tokens never come back; kept tokens keep their original positions.

Modules read layers (4, 14, 24) of a 32-layer LLM (the reimplementation's placement; the paper's figure
shows pruning at 4 and 14), moved proportionally on other depths when the heads are trained. The
budget is set at training (``tokensieve train-atp --flops F``, :mod:`tokensieve.learned.train_atp`):
the heads learn to meet it on average, and each sample keeps its own count. ``flops`` picks the heads
shipped for that target on the tiny LLaVA (0.5, the default, or 0.4); ``weights`` names any other file. Choices of ours where the
text was not available: post-softmax attention for both scores, the causal normalisation of S_self,
the mean-1 normalisation and the heads' inputs and shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch

from ..learned.atp_heads import ATPConfig, ThresholdHeads
from .base import Method, Point, Selection, View

CHECKPOINTS = Path(__file__).resolve().parent.parent / "learned" / "checkpoints"
SHIPPED_FLOPS = (0.5, 0.4)
"""The FLOPs targets of the threshold heads shipped for the tiny LLaVA (``atp_tiny_flops<F>.safetensors``)."""
EPS = 1e-6


def attention_scores(attention: torch.Tensor, weight: torch.Tensor, instruction: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ATP's redundancy score and its heads' attention statistics.

    Args:
        attention: ``(B, H, n, n)`` softmax attention of the layer before the module, every row a query.
        weight: ``(B, n)`` each row's visual keep weight (1 for an alive visual token, 0 for other rows;
            in training the soft weight).
        instruction: ``(B, n)`` bool, the instruction's query rows.

    Returns:
        ``(B, n)`` S_red (meaningful on visual rows) and ``(B, 2)`` the share of the visual queries'
        attention and of the instruction's attention that the visual tokens receive.
    """
    a = attention.float().mean(1)
    w, t = weight.float(), instruction.float()
    senders = w.flip(1).cumsum(1).flip(1)  # visual queries i >= j: those that may attend to j
    s_self = (w[:, :, None] * a).sum(1) / senders.clamp_min(EPS)
    s_cross = (t[:, :, None] * a).sum(1) / t.sum(1, keepdim=True).clamp_min(1.0)
    count = w.sum(1, keepdim=True).clamp_min(EPS)

    def unit_mean(s: torch.Tensor) -> torch.Tensor:
        return s / ((s * w).sum(1, keepdim=True) / count).clamp_min(EPS)

    received = (a * w[:, None, :]).sum(-1)  # (B, n): each query's attention on visual tokens
    shares = torch.stack([(received * w).sum(1) / count[:, 0], (received * t).sum(1) / t.sum(1).clamp_min(1.0)], 1)
    return (unit_mean(s_self) + unit_mean(s_cross)) / 2, shares


def grid_sample(rows: int, cols: int, stride: int) -> torch.Tensor:
    """``(rows * cols,)`` bool, row-major: the cells SAP samples, every ``stride``-th row and column."""
    r = torch.arange(rows)[:, None] % stride == 0
    c = torch.arange(cols)[None, :] % stride == 0
    return (r & c).reshape(-1)


@lru_cache(maxsize=8)
def _load(path: str, stamp: int) -> ThresholdHeads:
    """The heads of ``path``, read once per file version (``stamp``: its modification time)."""
    return ThresholdHeads.load(path)


@dataclass
class ATP(Method):
    """Options: ``weights`` (a file from ``tokensieve train-atp``) or ``flops`` (the target of heads
    shipped for the tiny LLaVA; default 0.5)."""

    weights: str | None = None
    flops: float | None = None
    _heads: ThresholdHeads | None = field(default=None, repr=False)
    _sampled: list[torch.Tensor] = field(default_factory=list, repr=False)

    name: ClassVar[str] = "atp"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Ye et al., ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models, CVPR 2025"
    needs: ClassVar[tuple[str, ...]] = ("attention", "text tokens")

    def validate(self) -> None:
        if self.weights is not None and self.flops is not None:
            raise ValueError("give weights or flops, not both: a file's heads meet the budget they were trained for")
        if self.flops is not None and float(self.flops) not in SHIPPED_FLOPS:
            raise ValueError(f"atp's budget is learned: heads are shipped for flops {', '.join(map(str, SHIPPED_FLOPS))}; "
                             f"for flops={self.flops} train heads (tokensieve train-atp --flops {self.flops}) and pass weights=")
        path = self.path
        self._heads = _load(str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else 0)

    @property
    def path(self) -> Path:
        if self.weights is not None:
            return Path(self.weights)
        return CHECKPOINTS / f"atp_tiny_flops{self.flops or SHIPPED_FLOPS[0]}.safetensors"

    @property
    def config(self) -> ATPConfig:
        return self._heads.config

    def bind(self, num_layers: int) -> None:
        if num_layers != self.config.num_layers:
            raise ValueError(f"the ATP heads were trained for a {self.config.num_layers}-layer model; "
                             f"this one has {num_layers} layers (train heads for it: tokensieve train-atp)")

    def points(self) -> list[Point]:
        return [Point(before=l + 1, attention_layer=l) for l in self.config.attention_layers]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """The mean counts measured after training (``record["kept"]``, per module); counts vary per sample."""
        kept = ThresholdHeads.record(str(self.path)).get("kept")
        if not kept:
            raise ValueError("these ATP heads carry no measured schedule (written without held-out items)")
        counts, n = [], n_visual
        for layer in range(num_layers):
            if layer in self.config.pruned_layers:
                n = max(1, round(kept[self.config.pruned_layers.index(layer)] * n_visual))
            counts.append(n)
        return counts, list(counts)

    def _spatial(self, view: View) -> torch.Tensor:
        """``(B, n)`` bool: the alive visual rows SAP sampled (fixed at the first module, by position)."""
        if view.point.before == self.config.pruned_layers[0]:
            self._sampled = []
            for b in range(view.hidden.shape[0]):
                if view.grids[b]:
                    cols = [g.index[grid_sample(g.rows, g.cols, self.config.stride).to(g.index.device)]
                            for g in view.grids[b]]
                    rows = torch.cat(cols)
                else:  # no regular grid: every stride**2-th visual token in sequence order
                    rows = view.visual[b].nonzero().squeeze(1)[:: self.config.stride ** 2]
                self._sampled.append(view.positions[b, rows])
        return torch.stack([torch.isin(view.positions[b], s) for b, s in enumerate(self._sampled)]) & view.visual

    @torch.no_grad()
    def select(self, view: View) -> Selection:
        config = self.config
        module = config.pruned_layers.index(view.point.before)
        visual = view.visual
        instruction = view.query_valid("text")
        if bool((visual.any(1) & ~instruction.any(1)).any()):
            raise ValueError("atp needs instruction text after the image: its cross-modal score reads it")
        red, shares = attention_scores(view.attention("all"), visual.float(), instruction)
        alive = visual.sum(1).float() / torch.tensor(view.visual_input, device=visual.device).clamp_min(1)
        theta_r, theta_s = self._heads.to(view.hidden.device)(torch.cat([shares, alive[:, None]], 1), module)
        spatial = self._spatial(view) & (config.spatial_score > theta_s[:, None])
        keep = visual & ((red > theta_r[:, None]) | spatial)
        for b in range(keep.shape[0]):  # at least one visual token: the highest-scoring
            if visual[b].any() and not keep[b].any():
                keep[b, torch.where(visual[b], red[b], float("-inf")).argmax()] = True
        return Selection(keep=keep | ~visual)

    def report_options(self) -> dict:
        return {"weights": self.weights or self.path.name, "layers": self.config.pruned_layers,
                "trained_for": {self.config.budget: self.config.target}}
