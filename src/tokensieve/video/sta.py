"""STA's pruning rule: semantic-aware temporal accumulation of redundancy, one stage at a time.

Ding, Yang, Li et al., "Prune Spatio-temporal Tokens by Semantic-aware Temporal Accumulation", ICCV 2023
(arXiv 2308.04549); authors' code Mark12Ding/STA (read at commit faf10be), ``model_vit.py``
``VisionTransformer.merge`` (called after every block by ``forward_features``), restated here on tensors:

* **When** (:func:`stage_grouping`): after block 0, block ``depth // 3`` and block ``2 * depth // 3``
  (ViT-B: 0, 4, 8 of 12); the sequence (time-major, tubelet by tubelet) is cut into ``T`` equal groups
  of consecutive tokens: 8, then 4 (processed last group first), then 2, for the release's 16 frames in
  8 tubelets. Here ``T`` is the clip's tubelets, then half, then a quarter of them (8, 4, 2 for the
  shipped model's 16 frames too) and the blocks are the same formula on the model's depth (the shipped
  6 blocks: 0, 2, 4).
* **Metric**: the block's attention keys averaged over heads (``Attention.forward`` returns
  ``k.mean(1)``), L2-normalised per token. **Importance**: the L1 norm of each token's block output
  (``x.abs().sum(-1)``), min-max normalised within its group. (The paper's figure shows a gradient-based
  importance; the code uses activation magnitude, and so does this module.)
* **First group** (``tome_drop``): bipartite matching inside the group, A = even, B = odd tokens of the
  current order; each A token's best cosine match in B; the group becomes the B tokens (in order)
  followed by the A tokens sorted by ascending best match, and the last ``r`` of them (the A tokens
  most similar to a B token) are dropped, not merged.
* **Later groups** (``t = 1 .. T - 1`` in processing order): the transport ``M_t = softmax over the
  current group's tokens of (m_t . m_{t-1}^T)``; at ``t = 1`` against all tokens of the first group,
  ``s = M_1 . 1`` (each earlier token spreads a unit of redundancy over the tokens like it); later
  against the previous group's kept tokens only, ``s = M_t . s_{t-1}``. Score ``s * (1 - importance)``;
  the ``N - r`` lowest-scored tokens stay (``topk(largest=False)``, in ascending score order), and
  their ``s`` renormalised to sum 1 becomes ``s_t``.
* **Output**: the groups' kept tokens concatenated in time order (the reversed stage prepends); a
  group keeps ``N - r`` of its ``N`` tokens, so every stage removes ``T * r`` tokens. One ``r`` for
  all stages (``run_inference.py --r``); the first group can lose at most its A half, so ``r`` is at
  most ``ceil(N / 2)`` of the smallest group.

Choices the release leaves open, made here: ties in a sort go to the earlier row (stable sorts; the
release's ``argsort``/``topk`` leave ties unspecified); a group whose importances are all equal gets
importance 0 (the release divides 0 by 0). Everything else (the row order inside each group, which the
next stage's even/odd split reads) is the release's.
"""

from __future__ import annotations

import torch


def stage_grouping(block: int, depth: int, tubelets: int) -> tuple[int, bool] | None:
    """``(T, reversed)`` for the stage after ``block`` (0-based) of ``depth``, None where STA does not prune."""
    if block == 0:
        return tubelets, False
    if block == depth // 3:
        return tubelets // 2, True
    if block == 2 * depth // 3:
        return tubelets // 4, False
    return None


def stage_blocks(depth: int) -> tuple[int, int, int]:
    """The blocks after which STA prunes.

    Raises:
        ValueError: ``depth`` below 3 (the three stages would not be distinct blocks).
    """
    if depth < 3:
        raise ValueError(f"STA prunes after three distinct blocks (0, depth // 3, 2 * depth // 3); depth {depth} is below 3")
    return 0, depth // 3, 2 * depth // 3


def importance(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, N)`` min-max-normalised L1 norm of each token of ``x`` ``(B, T, N, C)`` within its group."""
    magnitude = x.abs().sum(-1)
    low = magnitude.min(dim=-1, keepdim=True).values
    span = magnitude.max(dim=-1, keepdim=True).values - low
    return (magnitude - low) / torch.where(span > 0, span, torch.ones_like(span))


def first_group(metric: torch.Tensor, r: int) -> torch.Tensor:
    """``(B, N - r)`` local indices the first group keeps, in the release's order (``tome_drop``).

    Args:
        metric: ``(B, N, c)`` L2-normalised keys of the group's tokens.
        r: tokens to drop (at most the ``ceil(N / 2)`` A tokens).
    """
    n = metric.shape[1]
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    best = scores.max(dim=-1).values
    order = torch.sort(best, dim=-1, stable=True).indices
    odd = torch.arange(1, n, 2, device=metric.device).expand(metric.shape[0], -1)
    return torch.cat([odd, 2 * order], dim=1)[:, : n - r]


def stage(x: torch.Tensor, keys: torch.Tensor, groups: int, reverse: bool, r: int) -> torch.Tensor:
    """One STA stage: ``(B, n - groups * r)`` row indices of ``x`` to keep, in the release's order.

    Args:
        x: ``(B, n, C)`` the block's output, ``n`` a multiple of ``groups``.
        keys: ``(B, n, c)`` the block's keys averaged over heads (same rows).
        groups: ``T``, equal groups of consecutive rows; ``reverse``: process them last to first.
        r: tokens dropped per group.

    Raises:
        ValueError: ``n`` not a multiple of ``groups``, or ``r`` above what the first group can lose.
    """
    batch, n, _ = x.shape
    if n % groups:
        raise ValueError(f"STA: {n} tokens do not split into {groups} equal temporal groups")
    size = n // groups
    if not 0 <= r <= (size + 1) // 2:
        raise ValueError(f"STA: r={r} per group of {size} tokens; at most {(size + 1) // 2} (the A half of the first group)")
    m = keys.reshape(batch, groups, size, -1)
    m = m / m.norm(dim=-1, keepdim=True)
    weight = importance(x.reshape(batch, groups, size, -1))
    perm = list(range(groups - 1, -1, -1)) if reverse else list(range(groups))
    kept = {perm[0]: first_group(m[:, perm[0]], r)}
    s_agg = None
    for t in range(1, groups):
        g, prev = perm[t], perm[t - 1]
        if t == 1:
            transport = (m[:, g] @ m[:, prev].transpose(-1, -2)).softmax(dim=1)
            s_agg = transport.sum(dim=-1, keepdim=True)
        else:
            previous = m[:, prev].gather(1, kept[prev][..., None].expand(-1, -1, m.shape[-1]))
            transport = (m[:, g] @ previous.transpose(-1, -2)).softmax(dim=1)
            s_agg = transport @ s_agg
        score = s_agg[..., 0] * (1 - weight[:, g])
        kept[g] = torch.sort(score, dim=1, stable=True).indices[:, : size - r]
        s_agg = s_agg.gather(1, kept[g][..., None])
        s_agg = s_agg / s_agg.sum(dim=1, keepdim=True)
    return torch.cat([kept[g] + g * size for g in range(groups)], dim=1)
