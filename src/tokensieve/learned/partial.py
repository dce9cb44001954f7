"""Resumable training checkpoints of a learned pruner: its weights and the AdamW moments, as
safetensors (``<out>.partial.safetensors``), so a stopped run continues where it was."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_partial(path: Path, modules: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                 extra: dict[str, str] | None = None) -> None:
    """Write ``modules``' weights, ``optimizer``'s moments, the number of ``step`` s taken and ``extra``
    strings (a run's history, its RNG state) to ``path``."""
    tensors = {f"module.{k}": v.detach().contiguous() for k, v in modules.state_dict().items()}
    for i, p in enumerate(modules.parameters()):
        state = optimizer.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                tensors[f"optim.{i}.{name}"] = state[name].contiguous()
        if "step" in state:
            tensors[f"optim.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(path), metadata={**(extra or {}), "step": str(step)})


def load_partial(path: Path, modules: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, str]]:
    """Restore what :func:`save_partial` wrote into ``modules`` and ``optimizer``; the step to go on from
    and the ``extra`` strings.

    Raises:
        ValueError: no partial checkpoint at ``path``.
    """
    if not path.is_file():
        raise ValueError(f"nothing to resume: no partial checkpoint at {path}")
    tensors = load_file(str(path))
    modules.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    for i, p in enumerate(modules.parameters()):
        if f"optim.{i}.exp_avg" in tensors:
            optimizer.state[p] = {"exp_avg": tensors[f"optim.{i}.exp_avg"], "exp_avg_sq": tensors[f"optim.{i}.exp_avg_sq"],
                                  "step": tensors[f"optim.{i}.step"][0].clone()}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return int(meta.pop("step")), meta
