"""Exact softmax attention rows, recomputed from a decoder layer's own projections.

Methods that rank tokens by attention need a few rows of a layer's attention matrix. Rather than
forcing eager attention on the whole model, the engine recomputes just those rows from the layer's
input: input norm, q/k projections, the model's rotary embedding, GQA head sharing, the causal and
padding mask, softmax in fp32. This is ``len(queries) x n`` dot products per head instead of ``n x n``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .compat import mrope_unmerged


def take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a rotary table ``(..., B or 1, n, dim)`` at ``index`` (``(B, m)``): ``(..., B, m, dim)``.

    The leading dims hold M-RoPE's three sections where a model passes them unmerged (transformers 5.2).
    """
    lead = table.shape[:-3]
    batch, m = index.shape
    table = table.expand(*lead, batch, *table.shape[-2:])
    return table.gather(-2, index[..., None].expand(*lead, batch, m, table.shape[-1]))


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: nn.Module):
    """Apply the rotary embedding the way the layer's own modelling file does."""
    module = sys.modules[type(attn).__module__]
    if mrope_unmerged(cos):  # the model's own merge of M-RoPE's sections
        section = attn.config.rope_parameters["mrope_section"]
        return module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is not None:
        return apply(q, k, cos, sin)
    half = q.shape[-1] // 2

    def rot(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def attention_rows(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    queries: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 1.0,
    projected_q: torch.Tensor | None = None,
    projected_k: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of chosen query rows against all rows, at one decoder layer.

    Args:
        layer: a Llama-family decoder layer (``input_layernorm`` and ``self_attn`` with q/k projections).
        hidden: ``(B, n, d)`` the layer's input hidden states (before its input norm).
        cos, sin: ``(B, n, head_dim)`` rotary tables of the rows (batch dim may be 1; M-RoPE models on
            transformers 5.2 pass ``(3, B, n, head_dim)``).
        queries: ``(B, q)`` long, row indices of the queries.
        allowed: ``(B, q, n)`` bool, which keys each query may attend to (causal, padding).
        temperature: the scaled logits are divided by it before the softmax (1: the layer's own attention).
        projected_q, projected_k: ``(B, n, out)`` the layer's ``q_proj`` / ``k_proj`` outputs for all
            ``n`` rows where already computed (the engine's :mod:`~tokensieve.engine.projections`);
            computed here from the normed input otherwise.
        bias: ``(B, 1 or H, q, n)`` added to the scaled logits (a training-time soft mask), or None.

    Returns:
        ``(B, H, q, n)`` float32 probabilities; rows sum to 1 over allowed keys.
    """
    attn = layer.self_attn
    batch, n, _ = hidden.shape
    x = layer.input_layernorm(hidden) if projected_q is None or projected_k is None else None
    if projected_q is None:
        q = _rotated_queries(layer, x, cos, sin, queries)
    else:
        q = _rotate_queries(layer, projected_q.gather(1, queries[..., None].expand(-1, -1, projected_q.shape[-1])),
                            cos, sin, queries)
    k = attn.k_proj(x) if projected_k is None else projected_k
    k = k.view(batch, n, -1, attn.head_dim).transpose(1, 2)
    rows = torch.arange(n, device=hidden.device).expand(batch, n)
    _, k = rotate(k, k, take_rows(cos, rows), take_rows(sin, rows), attn)
    return _softmax_rows(q, k, allowed, attn.scaling / temperature, bias)


def cache_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention probabilities of chosen query rows of a pass against a layer's cached keys.

    Args:
        layer: a Llama-family decoder layer.
        hidden: ``(B, n, d)`` the layer's input hidden states in this pass (before its input norm).
        cos, sin: ``(B or 1, n, head_dim)`` rotary tables of those rows.
        queries: ``(B, q)`` long, row indices of the queries among the ``n``.
        keys: ``(B, H_kv, m, head_dim)`` the cached keys (post-rotary), this pass's included.
        allowed: ``(B, q, m)`` bool, which entries each query may attend to, or ``(B, H, q, m)`` per
            query head (entries a head no longer attends to after a per-head eviction).

    Returns:
        ``(B, H, q, m)`` float32 probabilities.
    """
    q = _rotated_queries(layer, layer.input_layernorm(hidden), cos, sin, queries)
    return _softmax_rows(q, keys, allowed, layer.self_attn.scaling)


def _rotated_queries(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     queries: torch.Tensor) -> torch.Tensor:
    """``(B, H, q, head_dim)`` rotated queries of rows ``queries`` of the normed input ``x``."""
    xq = x.gather(1, queries[..., None].expand(-1, -1, x.shape[-1]))
    return _rotate_queries(layer, layer.self_attn.q_proj(xq), cos, sin, queries)


def _rotate_queries(layer: nn.Module, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    queries: torch.Tensor) -> torch.Tensor:
    """``(B, H, q, head_dim)`` the rows ``queries`` of ``projected`` (``(B, q, out)``, their ``q_proj``
    outputs) split into heads and rotated."""
    attn = layer.self_attn
    q = projected.view(projected.shape[0], queries.shape[1], -1, attn.head_dim).transpose(1, 2)
    q, _ = rotate(q, q, take_rows(cos, queries), take_rows(sin, queries), attn)
    return q


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 softmax of ``q k^T * scale (+ bias)`` with GQA key sharing; disallowed entries get 0.
    ``allowed`` is ``(B, q, m)``, or ``(B, H, q, m)`` where each query head sees its own entries."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if bias is not None:
        scores = scores + bias.float()
    allowed = allowed[:, None] if allowed.dim() == 3 else allowed
    scores.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    empty = ~allowed.any(-1)  # a query row with no key to see (padding) gives 0, not NaN
    if bool(empty.any()):
        probs = probs.masked_fill(empty[..., None], 0.0)
    return probs
