"""Accuracy of a pruning setting on the object-count test split, with the same report fields as
``tokensieve eval``: accuracy, unpruned accuracy, agreement with the unpruned answers, tokens kept
per block, FLOPs pruned and unpruned and their ratio, and per item the prediction and kept positions."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from . import data, prune
from .model import CHECKPOINT, TinyVim


def evaluate(model: TinyVim, setting: prune.SsmPrune, items: int = 500, batch_size: int = 100,
             per_item: bool = True, cache: dict | None = None) -> dict:
    """Run ``setting`` and the unpruned model on test items ``0 .. items - 1``; the report as a dict.
    ``cache``: a dict to keep the test batches and unpruned predictions in across calls on one model.

    Raises:
        ValueError: ``items`` or ``batch_size`` below 1, or a budget the model cannot meet.
    """
    if items < 1 or batch_size < 1:
        raise ValueError(f"items and batch size must be at least 1, got {items} and {batch_size}")
    resolved = prune.plan(model.config, setting)
    right = right_unpruned = agree = 0
    rows = []
    start = time.time()
    for first in range(0, items, batch_size):
        n = min(batch_size, items - first)
        key = (first, n)
        if cache is not None and key in cache:
            images, labels, unpruned = cache[key]
        else:
            images, labels = data.batch("test", n, first)
            with torch.no_grad():
                unpruned = model(images).argmax(1)
            if cache is not None:
                cache[key] = (images, labels, unpruned)
        logits, kept = prune.run(model, images, setting, resolved, seeds=list(range(first, first + n)))
        predicted = logits.argmax(1)
        right += int((predicted == labels).sum())
        right_unpruned += int((unpruned == labels).sum())
        agree += int((predicted == unpruned).sum())
        if per_item:
            for i in range(n):
                rows.append({"item": first + i, "label": data.LABELS[int(labels[i])],
                             "prediction": data.LABELS[int(predicted[i])],
                             "unpruned_prediction": data.LABELS[int(unpruned[i])],
                             "kept_positions": [k[i].tolist() for k in kept]})
    config = model.config
    paper_flops = prune.flops(config, list(resolved.counts), aligned=False)
    report = {
        "settings": {"method": setting.method, "options": {k: v for k, v in asdict(setting).items() if k != "method"},
                     "score": setting.score_kind, "alignment": setting.alignment_kind, "task": f"{data.TASK} object count",
                     "prune_after_blocks": list(config.prune_after), "per_stage_ratio": resolved.ratio,
                     "device": "cpu", "dtype": "float32", "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "samples": items,
        "accuracy": right / items,
        "baseline_accuracy": right_unpruned / items,
        "agreement": agree / items,
        "tokens_kept": {"per_block": list(resolved.lengths), "after_stages": list(resolved.counts),
                        "of": config.patches, "mean_over_blocks": sum(resolved.lengths) / config.depth},
        "flops": resolved.flops,
        "flops_unpruned": resolved.flops_unpruned,
        "flops_ratio": resolved.flops_ratio,
        "flops_ratio_survivors_only": paper_flops / resolved.flops_unpruned,
        "seconds": round(time.time() - start, 2),
    }
    if per_item:
        report["items"] = rows
    return report


def load(model: str | Path | None) -> TinyVim:
    """The shipped classifier (``None`` or ``"tiny-ssm"``) or one in a folder ``train-tiny-ssm`` wrote."""
    return TinyVim.load(CHECKPOINT if model in (None, "tiny-ssm") else Path(model))


def format_report(report: dict) -> str:
    s, t = report["settings"], report["tokens_kept"]
    return "\n".join([
        f"{s['method']} (score {s['score']}, {s['alignment']}) on {report['samples']} items of {s['task']}",
        f"  accuracy {report['accuracy']:.3f} (unpruned {report['baseline_accuracy']:.3f}), agreement {report['agreement']:.3f}",
        f"  tokens per block {t['per_block']} of {t['of']} (per-stage ratio {s['per_stage_ratio']:.3f})",
        f"  FLOPs {report['flops'] / 1e6:.2f} M of {report['flops_unpruned'] / 1e6:.2f} M "
        f"(ratio {report['flops_ratio']:.3f}; survivors only {report['flops_ratio_survivors_only']:.3f})",
    ])
