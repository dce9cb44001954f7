"""The training loop of a learned pruner: the host model frozen, AdamW on the pruner's modules with
warmup and cosine decay, a progress bar, and a resumable checkpoint every ``save_every`` steps."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .batches import Batch, Batches
from .partial import load_partial, save_partial


def learning_rate(peak: float, step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


Step = Callable[[Batch], tuple[torch.Tensor, dict[str, float], list[float]]]
"""One step's forward: a batch -> (loss, numbers to show and record, kept fractions per module)."""


def run(modules: torch.nn.Module, step_loss: Step, batches: Callable[[int], Batches], out: Path, *, steps: int,
        batch_size: int, lr: float, warmup: int, weight_decay: float, save_every: int, resume: bool, desc: str,
        progress: bool) -> tuple[list[dict], float]:
    """Train ``modules`` for ``steps`` optimizer steps of ``step_loss`` on batches of ``batch_size`` from
    ``batches(step)`` (built once, seeded by the step it starts at), resuming from
    ``<out>.partial.safetensors`` when ``resume``. Returns the history (one entry per checkpoint) and
    the seconds spent; the partial checkpoint is left for the caller to remove.

    Raises:
        ValueError: non-positive steps or batch size, ``resume`` without a partial checkpoint.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch size must be positive")
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=weight_decay)
    partial = out.with_suffix(".partial.safetensors")
    step = load_partial(partial, modules, optimizer)[0] if resume else 0
    source = batches(step)
    start, history = time.time(), []
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, step, steps, warmup)
        loss, shown, kept = step_loss(source.draw(batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()} | {"kept": kept})
        bar.update()
        if step % save_every == 0 or step == steps:
            history.append({"step": step, **shown, "kept": kept})
            save_partial(partial, modules, optimizer, step)
    bar.close()
    return history, round(time.time() - start, 1)
