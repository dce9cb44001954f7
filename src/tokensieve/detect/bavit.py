"""BAViT: a background-aware token classifier in front of a ViT detector.

Sah, Kumar, Rohmetra, Saboori, "Token Pruning using a Lightweight Background Aware Vision Transformer",
FITML workshop at NeurIPS 2024, arXiv 2410.09324; the same system in US patent application
US 2026/0087793 A1. No code is public. What the sources state:

- a few ViT layers (2, or 10) without a [CLS] token, and a linear layer giving each patch token a
  foreground and a background score;
- trained on labels from segmentation maps and/or boxes with a cross-entropy accumulated over all
  tokens (the mean over images and tokens);
- at inference the background tokens are dropped, "completely or partially", and the rest go to the
  detector (YOLOS), which is not retrained; an optional "sparse fine-tuning" of the detector
  recovers part of the loss (here ``train-tiny-detector --sparse-classifier``, :mod:`.train_detector`).

Choices the sources leave open, made here:

- the classifier is a stock ``transformers`` ``ViTModel`` (no pooler) trained from scratch (the paper's
  BAViT-small is presumably initialised from a pretrained ViT-S; there is none here), at the
  detector's patch size so its tokens are the detector's patches. Its [CLS] token is removed by a
  hook on the embeddings, so the layers see patch tokens only;
- a patch is foreground when at least half of its pixels belong to an object (secondary summaries of
  the paper give an overlap of 0.5; :func:`tokensieve.detect.data.patch_labels`);
- a patch is background when its background probability exceeds 0.5; dropping "partially" with
  ``drop`` in [0, 1] removes that share (rounded down) of an image's background patches, those with the
  highest background probability first; ``drop=1`` removes them all. At least one patch is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTConfig, ViTModel

from . import data

CHECKPOINT = Path(__file__).parent / "checkpoint" / "bavit"
"""The shipped classifier (``tokensieve train-bavit`` writes one like it)."""
FOREGROUND_SHARE = 0.5
"""A patch is foreground when at least this share of its pixels are object pixels."""


def config(layers: int = 2, hidden: int = 64, heads: int = 2, patch: int = 8) -> ViTConfig:
    """The classifier's ViT: ``layers`` encoder layers of width ``hidden`` (MLP 4 x hidden), ``heads``
    heads, ``patch``-pixel patches on the 96-pixel scenes."""
    return ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                     image_size=data.IMAGE_SIZE, patch_size=patch)


class BAViT(nn.Module):
    """Patch-token foreground/background classifier: ``ViTModel`` without its [CLS] token, then a
    linear layer. ``forward(pixels (B, 3, 96, 96)) -> logits (B, P, 2)``, class 1 = foreground, patches
    row-major. ``vit``: a ready ViT (a loaded one), else a new one of ``vit_config``."""

    def __init__(self, vit_config: ViTConfig, vit: ViTModel | None = None) -> None:
        super().__init__()
        self.vit = vit if vit is not None else ViTModel(vit_config, add_pooling_layer=False)
        self.vit.embeddings.register_forward_hook(lambda module, args, out: out[:, 1:])
        self.head = nn.Linear(vit_config.hidden_size, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(pixel_values=pixels).last_hidden_state)

    def background_probability(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` probability that each patch is background."""
        return self(pixels).softmax(-1)[..., 0]

    def save(self, folder: Path, record: dict) -> None:
        """The ViT as ``save_pretrained`` writes it (``config.json``, ``model.safetensors``: transformers'
        own names, which every supported release loads), the head as ``head.safetensors``, and
        ``record.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.vit.save_pretrained(folder, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(folder / "head.safetensors"))
        (folder / "record.json").write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, source: str | Path = "bavit") -> "BAViT":
        """The shipped classifier (``"bavit"``) or one in a folder ``train-bavit`` wrote; eval mode.

        Raises:
            FileNotFoundError: no ``config.json``, ``model.safetensors`` and ``head.safetensors`` there.
        """
        folder = CHECKPOINT if str(source) == "bavit" else Path(source)
        if not all((folder / name).is_file() for name in ("config.json", "model.safetensors", "head.safetensors")):
            raise FileNotFoundError(f"no BAViT classifier in {folder}: expected config.json, model.safetensors and "
                                    "head.safetensors (train one with `tokensieve train-bavit --out DIR`)")
        vit = ViTModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True)
        model = cls(vit.config, vit)
        model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
        return model.eval()


@dataclass(frozen=True)
class Drop:
    """Which patches an image keeps under BAViT: ``drop`` of its predicted-background patches leave."""

    drop: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop <= 1.0:
            raise ValueError(f"drop must be in [0, 1] (the share of background patches dropped), got {self.drop}")

    def order(self, background: torch.Tensor) -> torch.Tensor:
        """``(P,)`` patch indices of one image from the last to leave to the first: the patches predicted
        foreground (they never leave), then the background ones from least to most background (of
        equal probabilities, the lower index leaves first)."""
        key = torch.where(background > 0.5, background, torch.full_like(background, -1.0))
        return torch.argsort(key, descending=True, stable=True).flip(0)

    def count(self, background: torch.Tensor) -> int:
        """How many patches one image keeps, from its ``(P,)`` background probabilities."""
        n_drop = int(self.drop * int((background > 0.5).sum()))
        return background.numel() - min(n_drop, background.numel() - 1)

    def kept(self, background: torch.Tensor) -> torch.Tensor:
        """``(K,)`` ascending patch indices kept, from one image's ``(P,)`` background probabilities."""
        return self.order(background)[: self.count(background)].sort().values

    def kept_batch(self, background: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` ascending patch indices for a batch ``(B, P)`` that must keep one count: ``K`` is the
        largest count an image keeps, and the others also keep their next patches in :meth:`order`."""
        k = max(self.count(row) for row in background)
        return torch.stack([self.order(row)[:k].sort().values for row in background])
