"""``tokensieve compare``: the main job, a short comparison of methods on the shipped model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import evaluation, models

SETTINGS: list[tuple[str, dict]] = [
    ("none", {}),
    ("fastv", {"layer": 2, "keep": 0.5}),
    ("fastv", {"layer": 2, "keep": 0.25}),
    ("random", {"keep": 0.5}),
    ("random", {"keep": 0.25}),
    ("pool", {"stride": 2}),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the basic methods on the shipped model (the README's main job)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local checkpoint directory or a hub id (offline cache)")
    p.add_argument("--task", default="all", help="one task name or 'all'")
    p.add_argument("--limit", type=int, default=40, help="test items per task")
    p.add_argument("--batch-size", type=int, default=20, help="samples per forward pass")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    evaluation.resolve_tasks(args.task)
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    model, processor = models.load(args.model)
    prompting = evaluation.Prompting.for_processor(processor)
    results: list[dict] = []
    for method, options in SETTINGS:
        baseline = results[0] if results else None
        results.append(evaluation.evaluate(model, prompting, args.task, method, options, args.limit, args.batch_size,
                                           baseline=baseline))
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def table(results: list[dict]) -> str:
    tasks = results[0]["settings"]["tasks"]
    head = ["method", "options", "FLOPs ratio", "visual kept", "accuracy", "agreement", *tasks, "TTFT ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["settings"]
        opts = ", ".join(f"{k}={v}" for k, v in s["options"].items() if v is not None)
        cells = [s["method"], opts or "-", f"{r['tflops'] / r['tflops_unpruned']:.3f}", f"{r['visual_tokens_kept']['mean']:.1f}",
                 f"{r['accuracy']:.3f}", f"{r['agreement']:.3f}", *(f"{r['per_task'][t]['accuracy']:.3f}" for t in tasks),
                 f"{r['ttft_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
