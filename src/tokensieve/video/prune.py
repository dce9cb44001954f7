"""STA, ToMe and random drop inside a stock ``VideoMAEForVideoClassification``: settings, budgets, FLOPs
and the forward pass.

* ``sta`` (:mod:`.sta`, Ding et al., ICCV 2023, Mark12Ding/STA ``model_vit.py``): after blocks 0,
  ``depth // 3`` and ``2 * depth // 3``, each of the stage's ``T`` temporal groups drops ``r`` tokens by
  semantic-aware temporal accumulation; one ``r`` for all stages, as the release's ``--r``.
* ``random``: after the same blocks, the same number of tokens as STA alive after each stage, drawn
  uniformly from all live tokens (the kept rows stay in their order); seeded per clip and stage, so a
  clip's choice does not depend on its batch. Equal FLOPs to ``sta`` by construction.
* ``tome`` (:mod:`.tome`, facebookresearch/ToMe ``tome/patch/timm.py`` ``ToMeBlock``): in every block,
  between the attention residual and the MLP, ``r_l`` tokens merge by bipartite soft matching on the
  block's keys averaged over heads, size-weighted, with proportional attention (``log(size)`` added to
  the logits, ``prop_attn=True``, the release's default). The total merges ``R`` are spread evenly over
  the blocks (``schedule="constant"``, ToMe's constant ``r``: ``R // depth`` per block, one more in the
  first ``R % depth``; or ``"decreasing"``, ToMe's ``(r, -1)``), each capped at half its tokens.

Hook points, without copying transformers' modelling code: the blocks' keys are recomputed from the
attention input (a forward hook on ``layernorm_before``) and the key weight (VideoMAE's key has no bias,
as the release's zero key bias; :func:`_keys_of`); STA and
random drop are forward hooks on the encoder layers that return the shortened output, so the stock
encoder loop, mean pooling, ``fc_norm`` and head run unchanged on the survivors. ToMe merges inside a
block, so each ``VideoMAELayer`` instance gets a ``forward`` that runs it as its two pre-norm halves
(``layernorm_before`` -> ``attention`` -> residual, merge, ``layernorm_after`` -> ``intermediate`` ->
``output`` with the residual), the one place this package restates a layer's structure (as the LLaVA
tower stage, :mod:`tokensieve.tower`, does for CLIP); the size bias reaches the stock attention through
a registered attention function (:func:`size_biased_attention`, SDPA with an additive mask).

Budgets: ``keep`` (fraction of the ``T * N`` tokens alive after the last stage, or after the last block
for ToMe) and ``flops`` (ratio of the whole classifier's analytic FLOPs, :func:`flops`); each resolves
to the setting that prunes least among those within the budget (STA and random: the smallest ``r``;
ToMe: the fewest merges). ``keep=1`` / ``flops=1`` prune nothing and install nothing: the logits are
the unpruned model's exactly.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import (
    AttentionInterface,
    VideoMAEConfig,
    VideoMAEForVideoClassification,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..shims import shim_forward
from . import sta, tome
from .model import grid

METHODS = ("sta", "tome", "random")
SCHEDULES = ("constant", "decreasing")
ATTENTION = "tokensieve_size_bias"


def size_biased_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA with ``module.size_bias`` ``(B, 1, 1, t)`` (ToMe's ``log(size)``), when set, as the additive mask."""
    bias = getattr(module, "size_bias", None)
    return sdpa_attention_forward(module, query, key, value, bias if bias is not None else attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, size_biased_attention)


@dataclass(frozen=True)
class VideoPrune:
    """One setting: ``method`` and exactly one of ``keep`` (fraction of tokens alive at the end, in (0, 1])
    and ``flops`` (target FLOPs ratio, in (0, 1]); ``seed`` of the random drop; ``prop_attn`` and
    ``schedule`` (:func:`tome_shares`) of ToMe.

    Raises:
        ValueError: unknown method, no budget or both, a budget outside (0, 1].
    """

    method: str = "sta"
    keep: float | None = None
    flops: float | None = None
    seed: int = 0
    prop_attn: bool = True
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if (self.keep is None) == (self.flops is None):
            raise ValueError("give exactly one budget: keep (fraction of tokens kept) or flops (FLOPs ratio)")
        for name in ("keep", "flops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class Plan:
    """What a setting resolves to. ``r``: STA's tokens per group per stage (``sta``, ``random``) or the
    total merges (``tome``); ``merges``: per block (``tome``); ``attention`` / ``mlp``: tokens at each
    block's attention and MLP; ``after_stages``: tokens alive after each stage (``tome``: each block)."""

    method: str
    r: int
    merges: tuple[int, ...]
    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    after_stages: tuple[int, ...]
    flops: int
    flops_unpruned: int

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unpruned


def flops(config: VideoMAEConfig, attention: list[int] | None = None, mlp: list[int] | None = None) -> int:
    """Analytic FLOPs (2 x multiply-accumulates) of one clip through the classifier; per block with ``t``
    tokens at attention and ``m`` at the MLP (None: unpruned)::

        q, k, v  2 t d 3d     q.k^T  2 t^2 d     attn.v  2 t^2 d     out  2 t d d     MLP  2 m d D  x 2

    plus the tubelet embedding ``2 n (3 tubelet p^2) d`` and the head ``2 d classes``. LayerNorms, GELU,
    softmax, residual adds, the mean and the pruning's own similarities are not counted."""
    tubelets, per = grid(config)
    n, d, inner = tubelets * per, config.hidden_size, config.intermediate_size
    attention = attention or [n] * config.num_hidden_layers
    mlp = mlp or attention
    total = 2 * n * config.num_channels * config.tubelet_size * config.patch_size ** 2 * d + 2 * d * config.num_labels
    for t, m in zip(attention, mlp):
        total += 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * m * d * inner
    return total


def sta_counts(config: VideoMAEConfig, r: int) -> list[int] | None:
    """Tokens alive after each STA stage with ``r`` per group, None when a stage cannot drop ``r``."""
    tubelets, per = grid(config)
    n, counts = tubelets * per, []
    for block in sta.stage_blocks(config.num_hidden_layers):
        groups, _ = sta.stage_grouping(block, config.num_hidden_layers, tubelets)
        if n % groups or r > (n // groups + 1) // 2:
            return None
        n -= groups * r
        counts.append(n)
    return counts


def _sta_plan(config: VideoMAEConfig, method: str, r: int) -> Plan:
    counts = sta_counts(config, r)
    assert counts is not None
    blocks = sta.stage_blocks(config.num_hidden_layers)
    tubelets, per = grid(config)
    n, lengths = tubelets * per, []
    for b in range(config.num_hidden_layers):
        lengths.append(n)
        if b in blocks:
            n = counts[blocks.index(b)]
    return Plan(method, r, (), tuple(lengths), tuple(lengths), tuple(counts), flops(config, lengths), flops(config))


def tome_shares(total: int, depth: int, schedule: str) -> list[int]:
    """``total`` merges over ``depth`` blocks: ``constant`` (ToMe's constant ``r``: ``total // depth``
    each, one more in the first ``total % depth``) or ``decreasing`` (ToMe's ``(r, -1)``: shares
    proportional to ``depth - 1 - l``, by largest remainder, ties to the earlier block)."""
    weights = [depth - 1 - b for b in range(depth)] if schedule == "decreasing" and depth > 1 else [1] * depth
    ideal = [total * w / sum(weights) for w in weights]
    shares = [math.floor(v + 1e-9) for v in ideal]
    for b in sorted(range(depth), key=lambda b: (-(ideal[b] - shares[b]), b))[: total - sum(shares)]:
        shares[b] += 1
    return shares


def _tome_plan(config: VideoMAEConfig, total: int, schedule: str) -> Plan:
    depth = config.num_hidden_layers
    tubelets, per = grid(config)
    t, merges, attention, mlp = tubelets * per, [], [], []
    for b, share in enumerate(tome_shares(total, depth, schedule)):
        r = min(share, t // 2)
        attention.append(t)
        t -= r
        merges.append(r)
        mlp.append(t)
    return Plan("tome", sum(merges), tuple(merges), tuple(attention), tuple(mlp), tuple(mlp),
                flops(config, attention, mlp), flops(config))


def candidates(config: VideoMAEConfig, method: str, schedule: str = "constant") -> list[Plan]:
    """Every plan of ``method`` on ``config``, from pruning nothing to the most it can prune."""
    tubelets, per = grid(config)
    if tubelets % 4:
        raise ValueError(f"STA's stages split {tubelets} tubelets into T, T/2, T/4 groups: needs a multiple of 4")
    if method == "tome":
        return [_tome_plan(config, total, schedule) for total in range(tubelets * per)]
    return [_sta_plan(config, method, r) for r in range(per + 1) if sta_counts(config, r) is not None]


def plan(config: VideoMAEConfig, setting: VideoPrune) -> Plan:
    """Resolve ``setting``'s budget on ``config``: the least pruning within it.

    Raises:
        ValueError: a budget below what the method can reach (the lowest is named).
    """
    options = candidates(config, setting.method, setting.schedule)
    n = options[0].attention[0]
    if setting.keep is not None:
        fits = [p for p in options if p.after_stages[-1] <= setting.keep * n + 1e-9]
        what, lowest = "keep", min(p.after_stages[-1] for p in options) / n
    else:
        fits = [p for p in options if p.flops_ratio <= setting.flops + 1e-12]
        what, lowest = "flops", min(p.flops_ratio for p in options)
    if not fits:
        raise ValueError(f"{what} {getattr(setting, what)} is out of reach for {setting.method} on this model: "
                         f"the lowest is {lowest:.4f}")
    return fits[0]


def random_seed(seed: int, item: int, stage: int) -> int:
    """The generator seed of the random drop of one clip at one stage."""
    return (seed * 1_000_003 + item) * 101 + stage


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _keys_of(layer: torch.nn.Module, store: dict) -> torch.utils.hooks.RemovableHandle:
    """Forward hook on the layer's ``layernorm_before``: ``store["keys"]`` = ``(B, t, head_dim)`` the
    attention's keys (``LN(x) W_k^T``, no key bias) averaged over heads. Recomputed from the key weight
    rather than hooked on the key projection, which transformers 5.2 applies as ``F.linear`` (no hook
    fires) and 5.24 as a module call."""
    attention = layer.attention.attention
    heads = attention.num_attention_heads

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        keys = torch.nn.functional.linear(out, attention.key.weight)
        store["keys"] = keys.view(*keys.shape[:2], heads, -1).mean(2)

    return layer.layernorm_before.register_forward_hook(hook)


@contextmanager
def _attention(model: VideoMAEForVideoClassification, name: str) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def run(model: VideoMAEForVideoClassification, pixel_values: torch.Tensor, setting: VideoPrune,
        resolved: Plan | None = None, seeds: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(B, classes)`` logits of ``pixel_values`` ``(B, frames, 3, H, W)`` under ``setting``, and the
    ``(B, k)`` original token positions (time-major, ``tubelet * N + row * side + col``) alive after each
    stage (``tome``: after each merging block, each merged token named by its smallest member), in row
    order. ``seeds``: one per clip for the random drop (default: the row index)."""
    resolved = resolved or plan(model.config, setting)
    layers = list(model.videomae.encoder.layer)
    batch = pixel_values.shape[0]
    tubelets, per = grid(model.config)
    state: dict[str, Any] = {"positions": torch.arange(tubelets * per).expand(batch, -1), "kept": []}
    with ExitStack() as stack:
        if resolved.r and setting.method == "tome":
            state["size"] = torch.ones(batch, tubelets * per)
            state["owner"] = state["positions"]
            if setting.prop_attn:
                stack.enter_context(_attention(model, ATTENTION))
            for b, layer in enumerate(layers):
                stack.callback(_keys_of(layer, state).remove)
                stack.callback(shim_forward(layer, _tome_block(layer, resolved.merges[b], state, setting.prop_attn)))
        elif resolved.r:
            blocks = sta.stage_blocks(len(layers))
            for i, b in enumerate(blocks):
                if setting.method == "sta":
                    stack.callback(_keys_of(layers[b], state).remove)
                hook = _stage_hook(b, i, resolved, setting, state, tubelets, seeds)
                stack.callback(layers[b].register_forward_hook(hook).remove)
        logits = model(pixel_values=pixel_values).logits
    return logits, state["kept"]


def _stage_hook(block: int, index: int, resolved: Plan, setting: VideoPrune, state: dict, tubelets: int,
                seeds: list[int] | None):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        x = output[0] if isinstance(output, tuple) else output
        if setting.method == "sta":
            groups, reverse = sta.stage_grouping(block, len(resolved.attention), tubelets)
            rows = sta.stage(x, state.pop("keys"), groups, reverse, resolved.r)
        else:
            count = resolved.after_stages[index]
            rows = torch.stack([
                torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(
                    random_seed(setting.seed, seeds[i] if seeds else i, index)))[:count].sort().values
                for i in range(x.shape[0])])
        state["positions"] = state["positions"].gather(1, rows)
        state["kept"].append(state["positions"])
        return _replace_output(output, x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1])))

    return hook


def _tome_block(layer: torch.nn.Module, r: int, state: dict, prop_attn: bool):
    """A ``VideoMAELayer`` forward as ToMe's ``ToMeBlock``: attention (size bias), merge ``r``, MLP."""
    attention = layer.attention.attention

    def forward(original: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        attention.size_bias = state["size"].log()[:, None, None, :].to(x.dtype) if prop_attn else None
        try:
            x = x + layer.attention(layer.layernorm_before(x), **kwargs)
        finally:
            attention.size_bias = None
        if r:
            dest = tome.bipartite_merge_map(state.pop("keys"), r)
            x, state["size"] = tome.merge_weighted(x, state["size"], dest)
            state["owner"] = dest.gather(1, state["owner"])
            first = torch.full(state["size"].shape, state["positions"].shape[1]).scatter_reduce(
                1, state["owner"], state["positions"], reduce="amin")
            state["kept"].append(first)
        return layer.output(layer.intermediate(layer.layernorm_after(x)), x)

    return forward
