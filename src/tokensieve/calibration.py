"""Fitting a FitPrune recipe to a FLOPs budget on calibration inputs (see :mod:`tokensieve.methods.fitprune`).

One measuring pass records each sample's unpruned attention masses per layer; then a binary search
over the tolerance alpha runs fitting passes (the model, through the engine, prunes layer by layer by
the fitting rule) and turns each into a recipe (floored mean of the per-sample removals). The stop rule
of a fitting pass is judged over all calibration samples at once, as in the release, whatever the
batches they are run in (:func:`_judge`), so the recipe does not depend on the batch size. Two searches
(see :mod:`tokensieve.methods.fitprune`): ``"release"``, the authors' bisection judged by each pass's
own stop rule, returning the last probe's recipe; ``"feasible"``, judged by the recipe's FLOPs ratio,
keeping the best recipe at or under the budget and repairing it to within ``tolerance``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .adapters import adapter_for
from .engine import prune
from .flops import Shape, prefill_flops
from .methods.fitprune import FitPruneSearch
from .recipe import Recipe


def recipe_ratio(shape: Shape, counts: dict[int, int], samples: list[tuple[int, int]], visual_only: bool) -> float:
    """FLOPs ratio of removing ``counts`` inside each layer, over samples given as (real tokens, visual tokens)."""
    pruned = full = 0
    for real, vis in samples:
        text = 0 if visual_only else real - vis
        n_in, n_out, n = [], [], vis
        for layer in range(shape.layers):
            n_in.append(n + text)
            n = max(1, n - counts.get(layer, 0))
            n_out.append(n + text)
        pruned += prefill_flops(shape, n_in, n_out)
        full += prefill_flops(shape, [vis + text] * shape.layers)
    return pruned / full


@torch.no_grad()
def calibrate(
    model: Any,
    batches: list[dict[str, torch.Tensor]],
    budget: float,
    visual_only: bool = False,
    tolerance: float = 0.01,
    iterations: int = 14,
    progress: bool = True,
    describe: dict[str, Any] | None = None,
    search: Literal["release", "feasible"] = "release",
) -> Recipe:
    """Fit a recipe for ``budget`` (FLOPs ratio in (0, 1)) on ``batches`` of model inputs.

    ``search="release"``: the authors' bisection (alpha steps down to 0.01; ``iterations`` unused);
    ``"feasible"``: at most ``iterations`` probes, then the repair step.

    Raises:
        ValueError: budget outside (0, 1), an unknown search, inputs without visual tokens, or (feasible
            search) a budget no recipe reaches.
    """
    if not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(f"the FLOPs budget must be in (0, 1), got {budget!r}")
    if search not in ("release", "feasible"):
        raise ValueError(f"search must be 'release' or 'feasible', got {search!r}")
    start = time.perf_counter()
    adapter = adapter_for(model)
    shape = Shape.from_config(adapter.text_config)
    measures: list[FitPruneSearch] = []
    samples: list[tuple[int, int]] = []
    for inputs in batches:
        measure = FitPruneSearch(num_layers=shape.layers, alpha=None, shape=shape, visual_only=visual_only)
        with prune(model, measure) as run:
            model(**inputs, use_cache=False)
        measures.append(measure)
        samples += [(s.hidden_lengths[0], s.visual_tokens) for s in run.report.samples]
    if any(v == 0 for _, v in samples):
        raise ValueError("every calibration input needs visual tokens")
    visual_tokens = round(sum(v for _, v in samples) / len(samples))

    def fit(alpha: float) -> tuple[dict[int, int], bool]:
        """The floored-mean recipe of one fitting pass over all samples, and whether its stop rule fired.

        The release's ``fit_model`` checks, before each layer, the FLOPs of all samples together; a
        sample's removals before that check depend on its own attention only. So each batch runs
        without stopping (``stop=False``) and the rule is judged here on the forecasts summed over
        every batch: the first layer that meets the budget ends the removals of all samples."""
        passes = []
        for inputs, measure in zip(batches, measures):
            fitting = FitPruneSearch(num_layers=shape.layers, alpha=alpha, budget=budget, shape=shape,
                                     visual_only=visual_only, masses=measure.masses, stop=False)
            with prune(model, fitting):
                model(**inputs, use_cache=False)
            passes.append(fitting)
        return _judge(passes, shape.layers, budget, len(samples))

    info = dict(describe or {})
    if search == "release":
        counts, alpha, reached = _release_search(fit, budget, progress)
        info["search"] = "release"
        info["last_probe_reached_budget"] = reached
    else:
        counts, alpha = _feasible_search(fit, shape, samples, visual_only, budget, tolerance, iterations, progress)
        info["search"] = "feasible"
    ratio = recipe_ratio(shape, counts, samples, visual_only)
    return Recipe(
        removed=counts,
        visual_tokens=visual_tokens,
        num_layers=shape.layers,
        model=str(info.pop("model", getattr(model.config, "_name_or_path", ""))),
        budget=budget,
        achieved=ratio,
        calibration=str(info.pop("calibration", "")),
        samples=len(samples),
        seed=int(info.pop("seed", 0)),
        alpha=alpha,
        flops_convention="visual" if visual_only else "all",
        seconds=time.perf_counter() - start,
        extra=info,
    )


def _judge(passes: list[FitPruneSearch], num_layers: int, budget: float, n_samples: int) -> tuple[dict[int, int], bool]:
    """The recipe of non-stopping fitting ``passes`` (one per batch) judged as one pass over all their
    samples: the stop layer is the first whose summed forecast is within ``budget`` of the summed
    unpruned FLOPs (the release's ``flops_reach``); removals from it on are dropped; the recipe is the
    floored mean over ``n_samples`` of the rest."""
    full = sum(sum(p.full) for p in passes)
    stop = next((layer for layer in range(num_layers)
                 if sum(sum(p.forecast[layer]) for p in passes) <= budget * full), None)
    totals = [0] * num_layers
    for p in passes:
        for layer, removed in p.removed.items():
            if stop is None or layer < stop:
                totals[layer] += sum(removed)
    counts = {layer: total // n_samples for layer, total in enumerate(totals) if total // n_samples > 0}
    return counts, stop is not None


RELEASE_STEP = 0.01


def _release_search(fit, budget: float, progress: bool) -> tuple[dict[int, int], float, bool]:
    """The authors' bisection over alpha: the last probe's recipe, its alpha and whether it reached."""
    lo, hi = 0.0, 1.0
    probes = math.ceil(math.log2(1 / RELEASE_STEP))
    bar = tqdm(total=probes, desc=f"calibrate flops={budget}", unit="probe", disable=not progress)
    counts, alpha, reached = {}, 0.5, False
    while hi - lo > RELEASE_STEP + 1e-6:
        alpha = (lo + hi) / 2
        counts, reached = fit(alpha)
        bar.set_postfix(alpha=f"{alpha:.4f}", reached=reached)
        bar.update()
        if reached:
            hi = alpha
        else:
            lo = alpha
    bar.close()
    return counts, alpha, reached


def _feasible_search(fit, shape: Shape, samples, visual_only: bool, budget: float, tolerance: float,
                     iterations: int, progress: bool) -> tuple[dict[int, int], float]:
    """tokensieve's search: the best recipe at or under the budget, repaired to within ``tolerance``."""
    lo, hi = 0.0, 1.0
    best: tuple[float, float, dict[int, int]] | None = None
    bar = tqdm(total=iterations, desc=f"calibrate flops={budget}", unit="probe", disable=not progress)
    for _ in range(iterations):
        alpha = (lo + hi) / 2
        counts, _ = fit(alpha)
        ratio = recipe_ratio(shape, counts, samples, visual_only)
        bar.set_postfix(alpha=f"{alpha:.4f}", ratio=f"{ratio:.4f}")
        bar.update()
        if ratio <= budget:
            if best is None or ratio > best[0]:
                best = (ratio, alpha, counts)
            hi = alpha
        else:
            lo = alpha
        if best is not None and budget - best[0] <= tolerance:
            break
    bar.total = bar.n  # the search may converge before `iterations` probes; the bar ends full either way
    bar.close()
    if best is None:
        counts, _ = fit(1.0)
        ratio = recipe_ratio(shape, counts, samples, visual_only)
        if ratio > budget:
            raise ValueError(f"no recipe reaches a FLOPs ratio of {budget}: pruning all it can, the fit gives {ratio:.3f}")
        best = (ratio, 1.0, counts)
    _, alpha, counts = best
    return _repair(shape, counts, samples, visual_only, budget, tolerance), alpha


def _repair(shape: Shape, counts: dict[int, int], samples, visual_only: bool, budget: float, tolerance: float) -> dict[int, int]:
    """Bring a feasible recipe within ``tolerance`` under the budget by the smallest steps: postpone one
    token's removal by one layer (or, at the last layer, give it back), taking each time the step with
    the largest ratio still at or under the budget."""
    counts = {l: n for l, n in counts.items() if n > 0}
    ratio = recipe_ratio(shape, counts, samples, visual_only)
    while budget - ratio > tolerance:
        best: tuple[float, dict[int, int]] | None = None
        for layer in [l for l, n in counts.items() if n > 0]:
            trial = dict(counts)
            trial[layer] -= 1
            if layer + 1 < shape.layers:
                trial[layer + 1] = trial.get(layer + 1, 0) + 1
            trial = {l: n for l, n in trial.items() if n > 0}
            trial_ratio = recipe_ratio(shape, trial, samples, visual_only)
            if ratio < trial_ratio <= budget and (best is None or trial_ratio > best[0]):
                best = (trial_ratio, trial)
        if best is None:
            break
        ratio, counts = best
    return counts
