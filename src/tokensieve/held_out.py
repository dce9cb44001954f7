"""A pruned classifier against its unpruned self on held-out items, for the architectures with their
own eval path (the vision SSM, the video ViT): accuracy, unpruned accuracy, agreement, per-item rows."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers

Batch = Callable[[int, int], tuple[Any, torch.Tensor]]
"""``(n, first)`` -> (the model inputs of test items ``first .. first + n - 1``, their ``(n,)`` labels)."""
Pruned = Callable[[Any, list[int]], tuple[torch.Tensor, list[torch.Tensor]]]
"""(inputs, the items' indices as seeds) -> (``(n, classes)`` logits, kept positions per stage ``(n, k)``)."""


@dataclass
class Tally:
    """Counts over the items, and one row per item when asked."""

    items: int
    right: int = 0
    right_unpruned: int = 0
    agree: int = 0
    rows: list[dict] = field(default_factory=list)

    def fields(self) -> dict[str, float | int]:
        """The report's ``samples``, ``accuracy``, ``baseline_accuracy`` and ``agreement``."""
        return {"samples": self.items, "accuracy": self.right / self.items,
                "baseline_accuracy": self.right_unpruned / self.items, "agreement": self.agree / self.items}


def tally(items: int, batch_size: int, batch: Batch, unpruned: Callable[[Any], torch.Tensor], pruned: Pruned,
          labels: tuple[str, ...], per_item: bool, cache: dict | None) -> Tally:
    """Score ``pruned`` and ``unpruned`` (inputs -> ``(n,)`` predictions) on test items ``0 .. items - 1``
    in batches of ``batch_size``. ``cache``: a dict keeping the batches and unpruned predictions across
    calls on one model."""
    result = Tally(items)
    for first in range(0, items, batch_size):
        n = min(batch_size, items - first)
        key = (first, n)
        if cache is not None and key in cache:
            inputs, truth, base = cache[key]
        else:
            inputs, truth = batch(n, first)
            with torch.no_grad():
                base = unpruned(inputs)
            if cache is not None:
                cache[key] = (inputs, truth, base)
        logits, kept = pruned(inputs, list(range(first, first + n)))
        predicted = logits.argmax(1)
        result.right += int((predicted == truth).sum())
        result.right_unpruned += int((base == truth).sum())
        result.agree += int((predicted == base).sum())
        if per_item:
            for i in range(n):
                result.rows.append({"item": first + i, "label": labels[int(truth[i])], "prediction": labels[int(predicted[i])],
                                    "unpruned_prediction": labels[int(base[i])], "kept_positions": [k[i].tolist() for k in kept]})
    return result


def environment() -> dict[str, str]:
    """Where the evaluation ran: device, dtype and versions, for a report's settings."""
    return {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
