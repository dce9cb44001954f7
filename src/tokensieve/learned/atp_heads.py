"""ATP-LLaVA's learned thresholds: per module, a small head that reads statistics of the instance's
attention and gives the two pruning thresholds.

Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025 (arXiv
2412.00447); no public code. The paper's text beyond its abstract and project page was not available
to us; what is stated there and in summaries of it: thresholds predicted per instance and per module
from the scores, differentiable (sigmoid) masks in training, hard masks at inference. Chosen here (the
equation structure follows the only public reimplementation, Sneha421/AI6103-ATP-LLaVA
``llava/model/atp_module.py``, which is not the authors'): each module's head reads three numbers
(the share of the visual queries' attention that the visual tokens receive, the same share of the
instruction's attention, and the fraction of the input's visual tokens still alive), a two-layer MLP
(GELU) gives two outputs ``o``; the redundancy threshold is ``exp(o_0)`` (scores are normalised to mean
1, so it starts at "keep what gets more than the average attention") and the spatial threshold
``sigmoid(o_1)`` (spatial scores lie in [0, 1]). The output layer starts at zero.

A set of heads is one safetensors file whose metadata holds the :class:`ATPConfig` as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import module_file

STATISTICS = 3
"""What each head reads: visual self-attention share, instruction-to-visual share, alive fraction."""

KIND = "ATP threshold-head"
"""What this module file holds (:mod:`tokensieve.learned.module_file`)."""


@dataclass(frozen=True)
class ATPConfig:
    """Placement and training target of a set of ATP modules.

    Attributes:
        attention_layers: the decoder layers whose attention each module reads; it prunes the visual
            tokens entering the next layer (increasing).
        num_layers: decoder layers of the host model.
        budget: what the training target measures: ``"flops"``, the prefill FLOPs ratio (analytic,
            :func:`tokensieve.flops.layer_macs`), or ``"keep"``, the mean over all decoder layers of
            the fraction of the input's visual tokens a layer processes (before the first module: 1).
        target: its value, met on average over the training batches.
        sampling_rate: SAP's share of grid cells sampled (``R_s``; stride ``round(sqrt(1 / R_s))``).
        lambda_sample: SAP's scaling (sampled tokens score ``max(0, 1 - R_s * lambda_sample)``).
        temperature: of the training masks ``sigmoid((score - threshold) * temperature)``.
        width: hidden width of each head.
    """

    attention_layers: tuple[int, ...]
    num_layers: int
    budget: str
    target: float
    sampling_rate: float = 0.25
    lambda_sample: float = 3.0
    temperature: float = 10.0
    width: int = 32

    def __post_init__(self) -> None:
        layers = self.attention_layers
        if not layers or list(layers) != sorted(set(layers)) or not all(0 <= l < self.num_layers - 1 for l in layers):
            raise ValueError(f"ATP attention layers must increase inside 0..{self.num_layers - 2}, got {layers}")
        if self.budget not in ("flops", "keep"):
            raise ValueError(f"budget must be 'flops' or 'keep', got {self.budget!r}")
        if not 0 < self.target <= 1:
            raise ValueError(f"the {self.budget} target must be in (0, 1], got {self.target}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")

    @property
    def pruned_layers(self) -> tuple[int, ...]:
        """The layers whose input each module prunes."""
        return tuple(l + 1 for l in self.attention_layers)

    @property
    def stride(self) -> int:
        return max(1, round((1 / self.sampling_rate) ** 0.5))

    @property
    def spatial_score(self) -> float:
        return max(0.0, 1.0 - self.sampling_rate * self.lambda_sample)


class ThresholdHeads(nn.Module):
    """One MLP per module: ``(B, 3)`` statistics -> ``(B,)`` redundancy and ``(B,)`` spatial thresholds."""

    def __init__(self, config: ATPConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(STATISTICS, config.width), nn.GELU(), nn.Linear(config.width, 2))
            for _ in config.attention_layers)
        for head in self.heads:
            nn.init.zeros_(head[2].weight)
            nn.init.zeros_(head[2].bias)

    def forward(self, stats: torch.Tensor, module: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.heads[module](stats.float())
        return out[:, 0].exp(), torch.sigmoid(out[:, 1])

    def save(self, path: str | Path, record: dict | None = None) -> None:
        """Weights and the config (and ``record``, e.g. how they were trained) in one safetensors file."""
        module_file.write(path, self, KIND, asdict(self.config), record)

    @classmethod
    def load(cls, path: str | Path) -> "ThresholdHeads":
        """Heads from a file :meth:`save` wrote.

        Raises:
            ValueError: no such file, or not an ATP file.
        """
        data, weights = module_file.read(path, KIND, "train-atp")
        heads = cls(ATPConfig(**{**data, "attention_layers": tuple(data["attention_layers"])}))
        heads.load_state_dict(weights)
        return heads.eval()

    record = staticmethod(module_file.record)
