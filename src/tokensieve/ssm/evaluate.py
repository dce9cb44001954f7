"""Accuracy of a pruning setting on the object-count test split, with the same report fields as
``tokensieve eval``: accuracy, unpruned accuracy, agreement with the unpruned answers, tokens kept
per block, FLOPs pruned and unpruned and their ratio, and per item the prediction and kept positions."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from .. import held_out
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
    start = time.time()
    scores = held_out.tally(items, batch_size, lambda n, first: data.batch("test", n, first), lambda x: model(x).argmax(1),
                            lambda x, seeds: prune.run(model, x, setting, resolved, seeds=seeds), data.LABELS, per_item, cache)
    config = model.config
    paper_flops = prune.flops(config, list(resolved.counts), aligned=False)
    report = {
        "settings": {"method": setting.method, "options": {k: v for k, v in asdict(setting).items() if k != "method"},
                     "score": setting.score_kind, "alignment": setting.alignment_kind, "task": f"{data.TASK} object count",
                     "prune_after_blocks": list(config.prune_after), "per_stage_ratio": resolved.ratio,
                     **held_out.environment()},
        **scores.fields(),
        "tokens_kept": {"per_block": list(resolved.lengths), "after_stages": list(resolved.counts),
                        "of": config.patches, "mean_over_blocks": sum(resolved.lengths) / config.depth},
        "flops": resolved.flops,
        "flops_unpruned": resolved.flops_unpruned,
        "flops_ratio": resolved.flops_ratio,
        "flops_ratio_survivors_only": paper_flops / resolved.flops_unpruned,
        "seconds": round(time.time() - start, 2),
    }
    if per_item:
        report["items"] = scores.rows
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
