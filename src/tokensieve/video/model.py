"""The tiny video classifier: a stock ``transformers`` ``VideoMAEForVideoClassification``.

VideoMAE (Tong et al., NeurIPS 2022) as STA prunes it (Mark12Ding/STA ``model_vit.py``
``VisionTransformer``, the ViT of VideoMAE's fine-tuning): a Conv3d tubelet embedding (2 frames x 16 x 16
pixels), fixed sine-cosine position embeddings, pre-norm blocks, no [CLS] token, the mean of the last
tokens through ``fc_norm`` and a linear head (``use_mean_pooling=True``). Shape (:func:`tiny_config`): 16
frames of 96 x 96 -> 8 tubelets x 36 tokens = 288 tokens, width 64, 6 blocks of 4 heads, MLP 256. The
checkpoint is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``), plus
``training_summary.json``; any VideoMAE classifier folder with ``use_mean_pooling`` loads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from .data import LABELS

CHECKPOINT = Path(__file__).parent / "checkpoint"
"""The shipped classifier (``tokensieve train-tiny-videomae`` writes one like it)."""


def tiny_config(hidden: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: int = 4, patch: int = 16,
                image: int = 96, frames: int = 16, tubelet: int = 2) -> VideoMAEConfig:
    """A small ``VideoMAEConfig`` for the ``change`` labels: mean pooling, q/v biases, LayerNorm eps 1e-6
    (VideoMAE's fine-tuning ViT), no dropout, SDPA attention."""
    return VideoMAEConfig(image_size=image, patch_size=patch, num_channels=3, num_frames=frames, tubelet_size=tubelet,
                          hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                          intermediate_size=mlp_ratio * hidden, hidden_act="gelu", hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, qv_bias=True, use_mean_pooling=True,
                          id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})


def grid(config: VideoMAEConfig) -> tuple[int, int]:
    """``(T, N)``: tubelets per clip and tokens per tubelet (the sequence is ``T * N`` tokens, time-major)."""
    side = config.image_size // config.patch_size
    return config.num_frames // config.tubelet_size, side * side


def load(folder: str | Path = CHECKPOINT) -> VideoMAEForVideoClassification:
    """The classifier saved in ``folder`` (default: the shipped one), in eval mode, on SDPA.

    Raises:
        ValueError: ``folder`` holds no VideoMAE classifier with mean pooling.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ValueError(f"no VideoMAE classifier at {folder} (needs config.json and model.safetensors)")
    if json.loads((folder / "config.json").read_text()).get("model_type") != "videomae":
        raise ValueError(f"{folder}/config.json is not a VideoMAE config")
    model = VideoMAEForVideoClassification.from_pretrained(folder, attn_implementation="sdpa")
    if not model.config.use_mean_pooling:
        raise ValueError(f"{folder}: STA's ViT has no [CLS] token; this model pools its first token (use_mean_pooling=False)")
    return model.eval()
