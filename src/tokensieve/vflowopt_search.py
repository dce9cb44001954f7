"""VFlowOpt's flow-guided hyperparameter search, with Optuna's TPE sampler (a Bayesian optimiser).

Objective (as in the release): the mean, over calibration inputs, of the cosine similarity between
the final-norm hidden state of the last prompt token with pruning and without, i.e. how well the
information that reaches the first generated token survives. Variables and ranges, the release's
(``src/lmms_eval-0.2.4/lmms_eval/models/llava_ov_opt_all.py``, ``optimize_ratios``): the global-token
threshold t in [0, 50], the recycling cell size m in [3, 24] (real), the entropy weight alpha in
[-1, 1], the first LLM stage's keep fraction as a share of the vision stage's in [0.2/0.375, 1]; the
vision-stage keep fraction in [budget, 1.5 * budget] (the release's [0.25, 0.375] for its 0.25 target,
scaled to the budget: our choice for other budgets). The last stage's fraction is solved from the
FLOPs budget, and settings that cannot meet the budget score -1. The release runs 300 calls of
scikit-optimize's GP optimiser; here Optuna's TPE sampler, with the trial count an option (default 40).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .adapters import adapter_for
from .engine import prune
from .evaluation import model_runtime
from .methods.vflowopt import VFlowOpt


def _last_hidden(model: Any, inputs: dict[str, torch.Tensor], method: VFlowOpt | None) -> torch.Tensor:
    norm = adapter_for(model).language_model.norm
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(out[:, -1].float()))
    try:
        with torch.no_grad():
            if method is None:
                model(**inputs, use_cache=False)
            else:
                with prune(model, method):
                    model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[-1]


def search(model: Any, batches: list[dict[str, torch.Tensor]], budget: float, trials: int = 40, seed: int = 0,
           progress: bool = True) -> dict[str, Any]:
    """Best VFlowOpt options for ``budget`` on ``batches``; returns the options, objective, timing,
    and the device, dtype, torch and transformers versions it ran with.

    Raises:
        ValueError: ``budget`` outside (0, 1) or ``trials`` below 1.
        TypeError: a model VFlowOpt cannot run on (before any trial).
    """
    import optuna

    if not 0 < budget < 1:
        raise ValueError(f"the FLOPs budget must be in (0, 1), got {budget!r}")
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    with prune(model, VFlowOpt(flops=budget)):  # a model VFlowOpt cannot run on is refused here, before any trial
        pass
    start = time.perf_counter()
    reference = [_last_hidden(model, inputs, None) for inputs in batches]

    def options(trial: "optuna.Trial") -> dict[str, Any]:
        vit_keep = trial.suggest_float("vit_keep", budget, min(1.0, 1.5 * budget))
        stage = vit_keep * trial.suggest_float("stage_share", 0.2 / 0.375, 1.0)
        return {"vit_keep": vit_keep, "stage_keep": (stage, stage), "t": trial.suggest_float("t", 0.0, 50.0),
                "m": trial.suggest_float("m", 3.0, 24.0), "alpha": trial.suggest_float("alpha", -1.0, 1.0),
                "flops": budget}

    def objective(trial: "optuna.Trial") -> float:
        try:
            method = VFlowOpt(**options(trial))
            sims = [torch.nn.functional.cosine_similarity(_last_hidden(model, inputs, method), ref, dim=-1).mean()
                    for inputs, ref in zip(batches, reference)]
        except ValueError:
            return -1.0
        return float(torch.stack(sims).mean())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    best = options(study.best_trial)
    return {"method": "vflowopt", "options": {**best, "stage_keep": list(best["stage_keep"])},
            "objective": study.best_value, "trials": trials, "budget": budget, "seed": seed,
            "seconds": time.perf_counter() - start, **model_runtime(model)}
