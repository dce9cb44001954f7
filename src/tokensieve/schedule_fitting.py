"""Fitting where and how much an in-LLM scorer prunes, for a FLOPs budget, on calibration inputs.

FitPrune's idea (Ye et al., AAAI 2025: choose per-layer removal counts on a small calibration batch
so that a divergence is least at a given FLOPs budget) taken to any method that ranks visual tokens
between decoder layers (FastV, PDrop, DART, TransPrune: :mod:`tokensieve.methods.scheduled`). The
method keeps its ranking rule; the fit chooses the layers it prunes before and how many it removes
there, and saves them as a :class:`~tokensieve.recipe.Recipe` (``method`` = that method).

Objective (``"kl"``): the mean over calibration samples of KL(p || q), p the unpruned and q the
pruned model's next-token distribution at the prompt's last position (the distribution the first
answer token is drawn from). It needs nothing but the model's logits, so it is the same for every
scorer; FitPrune's own attention-mass rule is specific to FitPrune's scores and stays there
(:mod:`tokensieve.calibration`).

Search (greedy, by the divergence paid per FLOP saved): the schedule starts empty. At each step every
candidate layer ``l`` (1 .. L-1) is tried with one more ``chunk`` of visual tokens removed before it
(they stay removed in every later layer; once all but one are removed somewhere, the chunk is moved to
``l`` from the nearest later layer that removes tokens); each trial costs one pass over the calibration inputs with
the method pruning by that trial recipe. The trial with the least ``(KL_trial - KL) / (ratio -
ratio_trial)`` is taken (the lowest layer on ties). When the descent reaches a budget, the recipe for
it is that state with its last chunk shrunk to the fewest tokens that still reach the budget; the
descent goes on to the next, lower budget. FLOPs ratios are the analytic
prefill FLOPs (:func:`tokensieve.flops.prefill_flops`, all tokens counted) over the calibration
samples. Choices made here, which FitPrune's paper leaves open for other scorers: the objective, the
greedy step (``chunk = round(step * N)``, ``step`` 1/16 by default) and the first layer (1: every
scorer reads a layer before the one it prunes, or that layer itself after one has run).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from . import methods
from .adapters import adapter_for
from .engine import prune
from .flops import Shape, prefill_flops
from .methods.scheduled import Scheduled
from .recipe import Recipe

FITTED = tuple(name for name, cls in methods.REGISTRY.items() if issubclass(cls, Scheduled))
"""The methods a schedule can be fitted for: those that take a fitted recipe."""


def check_fit(method: str, options: dict[str, Any]) -> None:
    """Raise ValueError unless ``method`` takes a fitted schedule and ``options`` (its rule's) are valid
    and leave its schedule to the fit."""
    if method not in FITTED:
        raise ValueError(f"a schedule can be fitted for {', '.join(FITTED)}, not {method!r}")
    clash = sorted(set(options) & {*methods.REGISTRY[method].schedule_options, "recipe"})
    if clash:
        raise ValueError(f"the fit chooses {method}'s schedule; drop {', '.join(clash)}")
    methods.get(method, **options)


def schedule_ratio(shape: Shape, recipe: Recipe, samples: list[tuple[int, int]]) -> float:
    """FLOPs ratio of pruning by ``recipe`` (removals before each layer) over ``samples`` given as
    (real tokens, visual tokens), all tokens counted."""
    pruned = full = 0
    for real, vis in samples:
        text = real - vis
        pruned += prefill_flops(shape, [recipe.kept_from(l, vis) + text for l in range(shape.layers)])
        full += prefill_flops(shape, [real] * shape.layers)
    return pruned / full


def _last_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` float64 log-probabilities at the last column (each sample's last token: the engine
    and the processors pad on the left)."""
    return torch.log_softmax(logits[:, -1].double(), dim=-1)


def fit_schedule(model: Any, batches: list[dict[str, torch.Tensor]], method: str, budget: float,
                 **kwargs: Any) -> Recipe:
    """:func:`fit_schedules` for one budget."""
    return fit_schedules(model, batches, method, [budget], **kwargs)[0]


@torch.no_grad()
def fit_schedules(
    model: Any,
    batches: list[dict[str, torch.Tensor]],
    method: str,
    budgets: list[float],
    options: dict[str, Any] | None = None,
    step: float = 1 / 16,
    progress: bool = True,
    describe: dict[str, Any] | None = None,
) -> list[Recipe]:
    """Fit ``method``'s schedule for each of ``budgets`` (FLOPs ratios in (0, 1)) on ``batches`` of model
    inputs, in one greedy descent: the recipe for a budget is the descent's state where it first
    reaches that budget (its last chunk shrunk), so one run fits several budgets as several runs would.

    ``options``: the method's other options (its rule, e.g. FastV's ``variant``), not its own schedule.
    Each recipe's ``extra`` records the final KL, the step, the passes run so far and the descent's path.

    Raises:
        ValueError: an unknown method, one of its schedule options given, a budget outside (0, 1) or
            out of reach, a step outside (0, 1), inputs without visual tokens.
    """
    options = dict(options or {})
    check_fit(method, options)
    if not budgets or any(not isinstance(b, (int, float)) or not 0 < b < 1 for b in budgets):
        raise ValueError(f"FLOPs budgets must be in (0, 1), got {budgets!r}")
    if not 0 < step < 1:
        raise ValueError(f"step must be in (0, 1), got {step!r}")
    start = time.perf_counter()
    shape = Shape.from_config(adapter_for(model).text_config)
    references, samples = [], []
    for inputs in batches:
        with prune(model, "none") as run:
            references.append(_last_log_probs(model(**inputs, use_cache=False).logits))
        samples += [(s.hidden_lengths[0], s.visual_tokens) for s in run.report.samples]
    if any(v == 0 for _, v in samples):
        raise ValueError("every calibration input needs visual tokens")
    n_visual = round(sum(v for _, v in samples) / len(samples))
    info = {"method_options": options, **(describe or {})}

    def recipe(removed: dict[int, int]) -> Recipe:
        return Recipe(removed=removed, visual_tokens=n_visual, num_layers=shape.layers, method=method,
                      objective="kl", model=str(info.get("model", "")))

    floor = schedule_ratio(shape, recipe({1: n_visual - 1}), samples)
    if min(budgets) < floor:
        raise ValueError(f"flops={min(budgets)} is out of reach: keeping one visual token from layer 1 on costs {floor:.3f}")
    passes = 0

    def divergence(removed: dict[int, int]) -> float:
        nonlocal passes
        pruner = methods.get(method, **options, recipe=recipe(removed))
        total = 0.0
        for inputs, reference in zip(batches, references):
            with prune(model, pruner):
                pruned = _last_log_probs(model(**inputs, use_cache=False).logits)
            total += float((reference.exp() * (reference - pruned)).sum())
        passes += 1
        return total / len(samples)

    def fitted(budget: float, removed: dict[int, int], ratio: float, kl: float) -> Recipe:
        out = recipe(removed)
        out.budget, out.achieved, out.samples = budget, ratio, len(samples)
        out.calibration, out.seed = str(info.get("calibration", "")), int(info.get("seed", 0))
        out.seconds = time.perf_counter() - start
        out.extra = {k: v for k, v in info.items() if k not in ("calibration", "seed", "model")}
        out.extra.update(kl=kl, step=step, chunk=chunk, passes=passes, path=list(path))
        return out

    chunk = max(1, round(step * n_visual))
    removed: dict[int, int] = {}
    kl, ratio = 0.0, 1.0
    path: list[dict[str, Any]] = []
    found: dict[float, Recipe] = {}
    bar = tqdm(desc=f"fit {method} flops={','.join(map(str, budgets))}", unit="step", disable=not progress)
    while len(found) < len(set(budgets)):
        best = None
        for layer in range(1, shape.layers):
            trial = _step(removed, layer, chunk, n_visual)
            if trial is None:
                continue
            trial_ratio = schedule_ratio(shape, recipe(trial), samples)
            if trial_ratio >= ratio:
                continue
            trial_kl = divergence(trial)
            cost = (trial_kl - kl) / (ratio - trial_ratio)
            if best is None or cost < best[0]:
                best = (cost, layer, trial, trial_kl, trial_ratio)
        if best is None:
            raise ValueError(f"flops={min(budgets)} is out of reach for {method}: the schedule cannot remove more")
        _, layer, removed, kl, ratio = best
        path.append({"layer": layer, "ratio": round(ratio, 6), "kl": round(kl, 6)})
        for budget in sorted(set(budgets) - set(found), reverse=True):
            if ratio <= budget:
                shrunk, shrunk_ratio = _shrink_last(shape, recipe, samples, removed, layer, budget)
                found[budget] = fitted(budget, shrunk, shrunk_ratio, divergence(shrunk))
        bar.set_postfix(ratio=f"{ratio:.3f}", kl=f"{kl:.4f}")
        bar.update()
    bar.close()
    return [found[b] for b in budgets]


def _step(removed: dict[int, int], layer: int, chunk: int, n_visual: int) -> dict[int, int] | None:
    """``removed`` with ``chunk`` more visual tokens removed before ``layer``: tokens not removed yet
    while any are left (one must stay), else moved from the nearest later layer that removes some
    (pruning them earlier); None when neither is possible."""
    free = n_visual - 1 - sum(removed.values())
    if free > 0:
        return {**removed, layer: removed.get(layer, 0) + min(chunk, free)}
    later = [l for l, n in sorted(removed.items()) if l > layer and n > 0]
    if not later:
        return None
    moved = min(chunk, removed[later[0]])
    trial = {**removed, layer: removed.get(layer, 0) + moved, later[0]: removed[later[0]] - moved}
    return {l: n for l, n in trial.items() if n > 0}


def _shrink_last(shape: Shape, recipe, samples, removed: dict[int, int], layer: int,
                 budget: float) -> tuple[dict[int, int], float]:
    """``removed`` with its count at ``layer`` lowered to the least that keeps the ratio within
    ``budget`` (the step's chunk may overshoot it); the schedule and its ratio."""
    count = removed[layer]
    while count > 1 and schedule_ratio(shape, recipe({**removed, layer: count - 1}), samples) <= budget:
        count -= 1
    shrunk = {**removed, layer: count}
    return shrunk, schedule_ratio(shape, recipe(shrunk), samples)
