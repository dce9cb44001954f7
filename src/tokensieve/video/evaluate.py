"""Accuracy of a pruning setting on the ``change`` test split, with the report fields of ``tokensieve
eval-ssm``: accuracy, unpruned accuracy, agreement with the unpruned answers, tokens per block, FLOPs
pruned and unpruned and their ratio, and per item the prediction and the kept positions."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from transformers import VideoMAEForVideoClassification

from .. import held_out
from . import data, prune, sta
from .model import CHECKPOINT, grid
from .model import load as load_folder


def evaluate(model: VideoMAEForVideoClassification, setting: prune.VideoPrune, items: int = 500, batch_size: int = 50,
             per_item: bool = True, cache: dict | None = None) -> dict:
    """Run ``setting`` and the unpruned model on test clips ``0 .. items - 1``; the report as a dict.
    ``cache``: a dict to keep the test batches and unpruned predictions in across calls on one model.

    Raises:
        ValueError: ``items`` or ``batch_size`` below 1, or a budget the model cannot meet.
    """
    if items < 1 or batch_size < 1:
        raise ValueError(f"items and batch size must be at least 1, got {items} and {batch_size}")
    resolved = prune.plan(model.config, setting)
    start = time.time()
    scores = held_out.tally(items, batch_size, lambda n, first: data.batch("test", n, first),
                            lambda x: model(pixel_values=x).logits.argmax(1),
                            lambda x, seeds: prune.run(model, x, setting, resolved, seeds=seeds), data.LABELS, per_item, cache)
    config = model.config
    tubelets, per = grid(config)
    options = {k: v for k, v in asdict(setting).items() if k not in ("method", "keep", "flops")}
    if setting.method != "tome":
        options = {k: v for k, v in options.items() if k == "seed" and setting.method == "random"}
    report = {
        "settings": {"method": setting.method, "budget": {"keep": setting.keep, "flops": setting.flops},
                     "options": options, "r": resolved.r, "merges_per_block": list(resolved.merges),
                     "task": f"{data.TASK} clip class ({len(data.LABELS)} classes)",
                     "stage_blocks": list(sta.stage_blocks(config.num_hidden_layers)) if setting.method != "tome" else [],
                     "tubelets": tubelets, "tokens_per_tubelet": per, **held_out.environment()},
        **scores.fields(),
        "tokens_kept": {"per_block": list(resolved.attention), "mlp_per_block": list(resolved.mlp),
                        "after_stages": list(resolved.after_stages), "of": tubelets * per,
                        "mean_over_blocks": sum(resolved.attention) / config.num_hidden_layers},
        "flops": resolved.flops,
        "flops_unpruned": resolved.flops_unpruned,
        "flops_ratio": resolved.flops_ratio,
        "seconds": round(time.time() - start, 2),
    }
    if per_item:
        report["items"] = scores.rows
    return report


def load(model: str | Path | None) -> VideoMAEForVideoClassification:
    """The shipped classifier (``None`` or ``"tiny-videomae"``) or a folder ``train-tiny-videomae`` (or
    ``save_pretrained`` of any mean-pooled VideoMAE classifier) wrote."""
    return load_folder(CHECKPOINT if model in (None, "tiny-videomae") else Path(model))


def format_report(report: dict) -> str:
    s, t = report["settings"], report["tokens_kept"]
    budget = ", ".join(f"{k} {v}" for k, v in s["budget"].items() if v is not None)
    knob = f"merges per block {s['merges_per_block']}" if s["method"] == "tome" else f"r {s['r']} per group"
    return "\n".join([
        f"{s['method']} ({budget}; {knob}) on {report['samples']} clips of {s['task']}",
        f"  accuracy {report['accuracy']:.3f} (unpruned {report['baseline_accuracy']:.3f}), agreement {report['agreement']:.3f}",
        f"  tokens per block {t['per_block']} of {t['of']}" + (f" (MLP {t['mlp_per_block']})" if s["method"] == "tome" else ""),
        f"  FLOPs {report['flops'] / 1e6:.2f} M of {report['flops_unpruned'] / 1e6:.2f} M (ratio {report['flops_ratio']:.3f})",
    ])
