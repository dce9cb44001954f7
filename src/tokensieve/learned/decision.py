"""LVPruning's decision modules: vision tokens attend over the language tokens and get keep/drop logits.

Sun et al., "LVPruning: An Effective yet Simple Language-Guided Vision Token Pruning Approach for
Multi-modal Large Language Models", Findings of NAACL 2025 (arXiv 2501.13652); no public code. The
paper states cross-attention modules at chosen LLM layers, vision tokens as queries and language tokens
as keys and values, a keep/drop decision per vision token made differentiable by Gumbel-Softmax, the
MLLM frozen. Its module sizes are not available to us; chosen here (and recorded in each file):
pre-norms on both sides, one multi-head cross-attention (``torch.nn.MultiheadAttention``, 4 heads), a
residual on the normed vision tokens, then a norm and a two-layer MLP (GELU) to two logits, index 0
"keep". The language tokens are the instruction's: the text after the last image (at inference the
question and the assistant prefix; in training the same rows, the answer excluded).

A set of modules is saved as one safetensors file; its metadata holds the :class:`DecisionConfig` as
JSON, so a file loads without code knowing its shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import module_file

KIND = "decision-module"
"""What this module file holds (:mod:`tokensieve.learned.module_file`)."""


@dataclass(frozen=True)
class DecisionConfig:
    """Shape and schedule of a set of decision modules.

    Attributes:
        hidden: the host LLM's hidden size.
        layers: the decoder layers whose *input* each module prunes (increasing).
        keep: per module, the fraction of the input's visual tokens kept from its layer on (cumulative,
            non-increasing): the training targets and the default inference budget.
        heads: cross-attention heads; ``mlp``: width of the MLP head.
        num_layers: decoder layers of the host model.
    """

    hidden: int
    layers: tuple[int, ...]
    keep: tuple[float, ...]
    num_layers: int
    heads: int = 4
    mlp: int = 64

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.keep) or not self.layers:
            raise ValueError(f"one keep fraction per module layer: layers {self.layers}, keep {self.keep}")
        if list(self.layers) != sorted(set(self.layers)) or not all(1 <= l < self.num_layers for l in self.layers):
            raise ValueError(f"module layers must increase inside 1..{self.num_layers - 1}, got {self.layers}")
        if any(not 0 < k <= 1 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"keep fractions must be in (0, 1] and non-increasing, got {self.keep}")


class DecisionModule(nn.Module):
    """``(B, n_v, d)`` vision rows attending over ``(B, n_t, d)`` language rows -> ``(B, n_v, 2)`` logits
    (index 0: keep)."""

    def __init__(self, hidden: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm_vision = nn.LayerNorm(hidden)
        self.norm_text = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(hidden)
        self.head = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Linear(mlp, 2))

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """``text_valid``: ``(B, n_t)`` bool, False on padding (each row needs one real text token)."""
        query, keys = self.norm_vision(vision), self.norm_text(text)
        context, _ = self.attention(query, keys, keys, key_padding_mask=~text_valid, need_weights=False)
        return self.head(self.norm_out(query + context))


class DecisionModules(nn.Module):
    """One :class:`DecisionModule` per layer of ``config.layers``."""

    def __init__(self, config: DecisionConfig) -> None:
        super().__init__()
        self.config = config
        self.modules_ = nn.ModuleList(DecisionModule(config.hidden, config.heads, config.mlp) for _ in config.layers)

    def at(self, layer: int) -> DecisionModule:
        return self.modules_[self.config.layers.index(layer)]

    def save(self, path: str | Path, record: dict | None = None) -> None:
        """Weights and the config (and ``record``, e.g. how they were trained) in one safetensors file."""
        module_file.write(path, self, KIND, asdict(self.config), record)

    @classmethod
    def load(cls, path: str | Path) -> "DecisionModules":
        """Modules from a file :meth:`save` wrote.

        Raises:
            ValueError: no such file, or not a decision-module file.
        """
        data, weights = module_file.read(path, KIND, "train-lvpruning")
        config = DecisionConfig(**{**data, "layers": tuple(data["layers"]), "keep": tuple(data["keep"])})
        modules = cls(config)
        modules.load_state_dict(weights)
        return modules.eval()

    record = staticmethod(module_file.record)
