"""Dropping patch tokens before a stock YOLOS encoder, and what that costs.

YOLOS's embeddings return ``[CLS] + patches + detection tokens`` with their position embeddings
already added (``YolosEmbeddings.forward``); with ``use_mid_position_embeddings=False`` no later layer
adds positions again. So a forward hook on ``detector.vit.embeddings`` that keeps rows ``0``,
``1 + kept patches`` and the detection rows drops patches exactly: each kept patch keeps its own
position, the encoder runs on the shorter sequence, and the detection tokens stay last, where
``YolosForObjectDetection`` reads them. All samples of a batch keep the same number of patches (the
encoder takes no attention mask).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import YolosForObjectDetection


@contextmanager
def keep_patches(detector: YolosForObjectDetection, kept: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``detector``'s forward sees only the patches ``kept`` ``(B, K)`` (indices into
    the row-major patch grid, each row distinct) of each sample.

    Raises:
        ValueError: ``kept`` not 2-D, or an index outside the grid (at the forward).
    """
    if kept.dim() != 2:
        raise ValueError(f"kept must be (batch, patches), got shape {tuple(kept.shape)}")
    patches = detector.vit.embeddings.patch_embeddings.num_patches
    detection = detector.config.num_detection_tokens

    def hook(module: torch.nn.Module, args: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        if kept.shape[0] != embeddings.shape[0]:
            raise ValueError(f"kept has {kept.shape[0]} rows, the batch {embeddings.shape[0]} images")
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= patches):
            raise ValueError(f"kept patch indices must be in [0, {patches}), got {int(kept.min())}..{int(kept.max())}")
        b = embeddings.shape[0]
        rows = torch.cat([torch.zeros(b, 1, dtype=torch.long), 1 + kept.long().cpu(),
                          torch.arange(1 + patches, 1 + patches + detection).expand(b, -1)], dim=1).to(embeddings.device)
        return embeddings.gather(1, rows[..., None].expand(-1, -1, embeddings.shape[-1]))

    handle = detector.vit.embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def keep_attended(detector: YolosForObjectDetection, layer: int, count: int) -> Iterator[list[torch.Tensor]]:
    """Inside the block, ``detector``'s encoder layers ``layer`` on see only the ``count`` patches the
    detection tokens attended to most in layer ``layer - 1``: its softmax attention (recomputed from
    that layer's own normed input and query/key projections), averaged over heads and detection
    tokens. Training-free, tokensieve's baseline (the rule of FastV's last-query ranking and EViT's
    [CLS] ranking, with YOLOS's detection tokens as the queries). Yields the list that receives each
    forward's ``(B, count)`` kept patch indices, ascending.

    Raises:
        ValueError: ``layer`` outside [1, layers - 1], or ``count`` outside [1, patches].
    """
    layers = detector.vit.encoder.layer
    patches = detector.vit.embeddings.patch_embeddings.num_patches
    detection = detector.config.num_detection_tokens
    if not 1 <= layer < len(layers):
        raise ValueError(f"layer must be in [1, {len(layers) - 1}], got {layer}")
    if not 1 <= count <= patches:
        raise ValueError(f"count must be in [1, {patches}], got {count}")
    source, kept_log, seen = layers[layer - 1], [], {}

    def remember(module: torch.nn.Module, args: tuple) -> None:
        seen["input"] = args[0]

    def prune(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        b, n, _ = hidden.shape
        attention = source.attention.attention
        heads, width = attention.num_attention_heads, attention.attention_head_size
        normed = source.layernorm_before(seen.pop("input"))
        q = attention.query(normed[:, -detection:]).view(b, detection, heads, width).transpose(1, 2)
        k = attention.key(normed).view(b, -1, heads, width).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * width ** -0.5).softmax(-1)  # (B, heads, detection, N)
        score = probs[..., 1:1 + patches].mean(dim=(1, 2))
        kept = score.topk(count, dim=-1).indices.sort(dim=-1).values
        kept_log.append(kept)
        rows = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=hidden.device), 1 + kept,
                          torch.arange(n - detection, n, device=hidden.device).expand(b, -1)], dim=1)
        return (hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    handles = [source.register_forward_pre_hook(remember), layers[layer].register_forward_pre_hook(prune)]
    try:
        yield kept_log
    finally:
        for handle in handles:
            handle.remove()


def vit_layer_macs(tokens: int, hidden: int, intermediate: int) -> int:
    """Multiply-accumulates of one ViT encoder layer on ``tokens`` tokens: q, k, v and output
    projections ``4 n d^2``, scores and weighted sum ``2 n^2 d``, the two-matrix MLP ``2 n d m``."""
    return 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 2 * tokens * hidden * intermediate


def encoder_flops(config, tokens: int) -> int:
    """FLOPs (2 x MACs) of the encoder layers of ``config`` (a transformers ViT or YOLOS config) on a
    sequence of ``tokens`` tokens."""
    return 2 * config.num_hidden_layers * vit_layer_macs(tokens, config.hidden_size, config.intermediate_size)


def embedding_flops(config, patches: int) -> int:
    """FLOPs (2 x MACs) of the patch embedding of ``config`` on ``patches`` patches."""
    return 2 * patches * config.num_channels * config.patch_size ** 2 * config.hidden_size
