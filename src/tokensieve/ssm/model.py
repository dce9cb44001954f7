"""A tiny Vim-style image classifier built from transformers' Mamba mixers.

Vision Mamba (Zhu et al., ICML 2024, hustvl/Vim ``vim/models_mamba.py``; the copy in ZLKong/ToP-ViM
is the one ToP prunes): patch embedding by a strided convolution, learned absolute position embeddings, a stack of
bidirectional blocks, a final RMSNorm and a linear head on the mean of the tokens (Vim's
``final_pool_type="mean"``; its released ImageNet models read a class token in the middle of the
sequence instead: with 64 tokens, a power of two, the parallel scan used in training needs no padding,
which a 65th token would double). Each block is
pre-norm with a residual: ``x + F(norm(x)) + flip(B(flip(norm(x))))``, ``F`` and ``B`` two
``transformers`` ``MambaMixer`` (forward and backward scans; no hand-written selective scan). Vim's
"v2" mixer shares ``in_proj`` and ``out_proj`` between its two scans and halves their sum; here each
direction is a whole stock mixer and their outputs are summed (the brief's construction).

The weights are one safetensors file and the architecture one JSON file (:class:`VimConfig`); no
pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.mamba.modeling_mamba import MambaRMSNorm

from . import hf_mamba

CHECKPOINT = Path(__file__).parent / "checkpoint"
"""The shipped classifier (``tokensieve train-tiny-ssm`` writes one like it)."""


@dataclass(frozen=True)
class VimConfig:
    """Shape of the classifier.

    Attributes:
        image: square image side in pixels; ``patch``: patch side (the grid is ``image // patch``).
        hidden: model width ``d``; ``state``: SSM state size ``N``; ``expand``: ``E = expand * d``;
        conv: causal convolution width ``K``; ``dt_rank``: time-step rank ``R``.
        depth: bidirectional blocks; ``classes``: output classes (``labels`` name them).
        prune_after: the blocks (0-based) after which ToP prunes (see :mod:`tokensieve.ssm.prune`).
    """

    image: int = 96
    patch: int = 12
    hidden: int = 64
    state: int = 16
    expand: int = 2
    conv: int = 4
    dt_rank: int = 4
    depth: int = 6
    classes: int = 3
    labels: tuple[str, ...] = ("2", "3", "4")
    prune_after: tuple[int, ...] = (1, 2, 3)
    channels: int = 3
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.image % self.patch:
            raise ValueError(f"image side {self.image} is not a multiple of the patch side {self.patch}")
        if len(self.labels) != self.classes:
            raise ValueError(f"{self.classes} classes but {len(self.labels)} labels")
        if list(self.prune_after) != sorted(set(self.prune_after)) or not all(0 <= b < self.depth - 1 for b in self.prune_after):
            raise ValueError(f"prune_after must increase inside 0..{self.depth - 2}, got {self.prune_after}")

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def length(self) -> int:
        """Sequence length: the patches (row-major)."""
        return self.patches

    @property
    def inner(self) -> int:
        return self.expand * self.hidden

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "VimConfig":
        data = json.loads(text)
        for key in ("labels", "prune_after"):
            data[key] = tuple(data[key])
        return cls(**data)


class BiBlock(nn.Module):
    """Pre-norm residual block with a forward and a backward (flipped) Mamba mixer, outputs summed."""

    def __init__(self, config: VimConfig, mamba_config, index: int) -> None:
        super().__init__()
        self.norm = MambaRMSNorm(config.hidden, eps=config.eps)
        self.forward_mixer = hf_mamba.make_mixer(mamba_config, 2 * index)
        self.backward_mixer = hf_mamba.make_mixer(mamba_config, 2 * index + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        out = hf_mamba.run_mixer(self.forward_mixer, h) + hf_mamba.run_mixer(self.backward_mixer, h.flip(1)).flip(1)
        return x + out


class TinyVim(nn.Module):
    """``(B, 3, H, W)`` normalised images -> ``(B, classes)`` logits; :meth:`embed`, ``blocks`` and
    :meth:`head_logits` are the pieces pruning runs between."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.config = config
        mamba = hf_mamba.mamba_config(config.hidden, config.state, config.expand, config.conv, config.dt_rank,
                                      2 * config.depth)
        self.patch_embed = nn.Conv2d(config.channels, config.hidden, config.patch, stride=config.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.length, config.hidden))
        self.blocks = nn.ModuleList(BiBlock(config, mamba, i) for i in range(config.depth))
        self.norm_f = MambaRMSNorm(config.hidden, eps=config.eps)
        self.head = nn.Linear(config.hidden, config.classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)``: patch embeddings (row-major) plus position embeddings."""
        return self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed

    def head_logits(self, x: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the last hidden states: final norm, mean over the tokens (over the ``alive`` rows
        only when a ``(B, L)`` bool mask is given), linear head."""
        h = self.norm_f(x)
        if alive is None:
            return self.head(h.mean(1))
        weight = alive.to(h.dtype)[..., None]
        return self.head((h * weight).sum(1) / weight.sum(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head_logits(x)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, folder: str | Path, summary: dict | None = None) -> None:
        """``model.safetensors`` and ``config.json`` (and ``training_summary.json`` when given) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(self.config.to_json() + "\n")
        if summary is not None:
            (folder / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path = CHECKPOINT) -> "TinyVim":
        """The classifier saved in ``folder`` (default: the shipped one), in eval mode.

        Raises:
            ValueError: ``folder`` holds no ``config.json`` and ``model.safetensors``.
        """
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ValueError(f"no tiny SSM classifier at {folder} (needs config.json and model.safetensors)")
        model = cls(VimConfig.from_json((folder / "config.json").read_text()))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()
