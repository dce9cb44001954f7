"""Helpers for multi-stage methods: layer defaults scaled to model depth, and budget solving."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..flops import Shape, prefill_flops

if TYPE_CHECKING:
    from .base import View


def scaled_layers(published: tuple[int, ...], published_depth: int, num_layers: int) -> tuple[int, ...]:
    """The published stage layers for a ``published_depth``-layer model, moved proportionally to a
    ``num_layers``-layer one, strictly increasing and inside ``1 .. num_layers - 2``."""
    if num_layers == published_depth:
        return published
    out: list[int] = []
    for layer in published:
        x = max(1, min(num_layers - 2, round(layer * num_layers / published_depth)))
        if out and x <= out[-1]:
            x = out[-1] + 1
        out.append(x)
    if out[-1] > num_layers - 2:
        raise ValueError(f"a {num_layers}-layer model is too shallow for {len(published)} stages")
    return tuple(out)


def solve_scale(shape: Shape, n_visual: int, n_text: int, visual_per_layer: Callable[[float], list[int]],
                target: float, what: str, most: float = 1.0) -> float:
    """Largest scale c in (0, ``most``] whose schedule ``visual_per_layer(c)`` (visual tokens entering each
    layer) costs at most ``target`` of the unpruned prefill (all tokens counted)."""
    full = prefill_flops(shape, [n_visual + n_text] * shape.layers)

    def ratio(c: float) -> float:
        return prefill_flops(shape, [v + n_text for v in visual_per_layer(c)]) / full

    if ratio(1e-9) > target:
        raise ValueError(f"flops={target} is out of reach for {what}: at most {ratio(1e-9):.3f}")
    lo, hi = 1e-9, most
    if ratio(hi) <= target:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) <= target else (lo, mid)
    return lo


def budget_scales(view: "View", flops: float | None, solved: dict[int, float],
                  visual_per_layer: Callable[[int, float], list[int]], what: str, most: float) -> list[float]:
    """Per sample of ``view``, the scale of its schedule ``visual_per_layer(n_visual, c)`` that meets
    ``flops`` (:func:`solve_scale`; 1.0 without a budget), solved once per sample of a pass and kept in
    ``solved`` (the caller empties it at its first stage)."""
    scales = []
    for b, n_in in enumerate(view.visual_input):
        if flops is not None and b not in solved:
            text_tokens = int(view.query_valid("all")[b].sum()) - n_in
            solved[b] = solve_scale(view.shape, n_in, text_tokens, lambda c: visual_per_layer(n_in, c), flops, what, most=most)
        scales.append(1.0 if flops is None else solved[b])
    return scales
