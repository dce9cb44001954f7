"""The training loop of a model the project trains whole (the tiny SSM, VideoMAE, YOLOS and BAViT):
AdamW steps on a step-based schedule (:func:`.loop.learning_rate`), a progress bar, the mean of each
shown number over every ``save_every`` steps in the history (over the steps that showed it), and a resumable checkpoint then
(``<out>/partial.safetensors``: weights, AdamW moments, step, history, seconds, torch's RNG state), so a
stopped run continues to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .loop import learning_rate
from .partial import load_partial, save_partial

StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, float]]]
"""Step ``s`` -> (the loss to minimise, the numbers to show and record)."""


def adamw(module: torch.nn.Module, lr: float, no_decay: Callable[[str], bool], betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters: weight decay ``weight_decay`` on those whose name
    ``no_decay`` refuses, none on the others (in ``named_parameters`` order, decayed group first)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if not no_decay(n)], "weight_decay": weight_decay},
                              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}], lr=lr, betas=betas)


def fit(trained: torch.nn.Module, optimizer: torch.optim.Optimizer, step_loss: StepLoss, out: Path, *, steps: int,
        lr: float, warmup: int, save_every: int, resume: bool, clip: float | None, desc: str,
        progress: bool = True) -> tuple[list[dict], float]:
    """Run ``step_loss`` for steps ``0 .. steps - 1`` (from the partial checkpoint's step when
    ``resume``), clipping the gradient norm at ``clip`` if given. Returns the history and the seconds
    spent (those of the interrupted part included); the partial checkpoint is left for the caller.

    Raises:
        ValueError: ``resume`` without a partial checkpoint in ``out``.
    """
    partial = Path(out) / "partial.safetensors"
    step, history, seconds = 0, [], 0.0
    if resume:
        step, meta = load_partial(partial, trained, optimizer)
        history, seconds = json.loads(meta["history"]), float(meta["seconds"])
        torch.random.set_rng_state(torch.tensor(json.loads(meta["rng"]), dtype=torch.uint8))
    start = time.time() - seconds
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress)
    window: list[dict[str, float]] = []
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, step, steps, warmup)
        loss, shown = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(trained.parameters(), clip)
        optimizer.step()
        step += 1
        window.append(shown)
        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        bar.update()
        if step % save_every == 0 or step == steps:
            keys = list(dict.fromkeys(k for w in window for k in w))  # a number a step did not show is left out
            history.append({"step": step} | {k: round(sum(w[k] for w in window if k in w) / sum(k in w for w in window), 5)
                                             for k in keys})
            window = []
            save_partial(partial, trained, optimizer, step, {
                "history": json.dumps(history), "seconds": str(time.time() - start),
                "rng": json.dumps(torch.random.get_rng_state().tolist())})
    bar.close()
    return history, round(time.time() - start, 1)
