"""The tiny detector: a stock ``transformers`` ``YolosForObjectDetection`` shaped for the 96x96 scenes.

YOLOS (Fang et al., NeurIPS 2021; hustvl/YOLOS) is a plain ViT whose sequence is [CLS], the patch tokens
and ``num_detection_tokens`` learned detection tokens; each detection token's last hidden state gives a
class (plus "no object") and a box, trained with DETR's Hungarian loss (transformers computes it when
``labels`` are passed; it needs ``scipy``). The shape here follows ``hustvl/yolos-tiny`` scaled down:
no mid-layer position embeddings (so the patch tokens can be dropped after the embeddings without
touching any later layer, :mod:`.prune`), 8-pixel patches (a 12x12 grid: each object covers 2x2
patches), 8 detection tokens (at most 4 objects per scene). The model is saved with
``save_pretrained`` (``config.json`` + ``model.safetensors``) and loaded with ``from_pretrained`` from a
local folder, offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import YolosConfig, YolosForObjectDetection

from . import data

CHECKPOINT = Path(__file__).parent / "checkpoint" / "detector"
"""The shipped detector (``tokensieve train-tiny-detector`` writes one like it)."""


def config(hidden: int = 128, layers: int = 4, heads: int = 4, detection_tokens: int = 8, patch: int = 8) -> YolosConfig:
    """A YOLOS configuration for the scenes: ``hidden`` width, ``layers`` encoder layers, ``heads``
    attention heads (MLP width 4 x hidden), ``detection_tokens``, ``patch`` pixels per patch side."""
    return YolosConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        image_size=[data.IMAGE_SIZE, data.IMAGE_SIZE], patch_size=patch, num_detection_tokens=detection_tokens,
        use_mid_position_embeddings=False, num_labels=len(data.CLASSES),
        id2label=dict(enumerate(data.CLASSES)), label2id={c: i for i, c in enumerate(data.CLASSES)})


def initialise(detector: YolosForObjectDetection) -> YolosForObjectDetection:
    """Draw the [CLS] token, the detection tokens and the position embeddings from a normal
    distribution of std 0.02 (truncated at +-2, so in effect untruncated), as hustvl/YOLOS does
    (``models/backbone.py`` at 5717fc2: ``trunc_normal_(..., std=.02)``); transformers leaves them at zero, and with identical detection tokens and
    no positions a detector trained from scratch starts symmetric. In place; returns ``detector``."""
    embeddings = detector.vit.embeddings
    with torch.no_grad():
        for parameter in (embeddings.cls_token, embeddings.detection_tokens, embeddings.position_embeddings):
            torch.nn.init.trunc_normal_(parameter, std=0.02, a=-2.0, b=2.0)
    return detector


def load(source: str | Path = "tiny-detector") -> YolosForObjectDetection:
    """The shipped detector (``"tiny-detector"``) or one in a folder ``train-tiny-detector`` wrote; eval mode.

    Raises:
        FileNotFoundError: no ``config.json`` and ``model.safetensors`` in the folder.
    """
    folder = CHECKPOINT if str(source) == "tiny-detector" else Path(source)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no detector in {folder}: expected config.json and model.safetensors "
                                "(train one with `tokensieve train-tiny-detector --out DIR`)")
    return YolosForObjectDetection.from_pretrained(folder, use_safetensors=True).eval()
