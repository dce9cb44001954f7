"""What the two in-model classifier evaluations share (``eval-ssm``, ``eval-video-vit``): the budget
and run flags, and the run: output path checked first, threads set, the model loaded and evaluated
against its unpruned self, the report written as JSON and printed."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any, Callable

from .options import check_output_file


def add_budget(parser: argparse.ArgumentParser, tokens: str) -> None:
    """``--keep`` (the fraction of ``tokens`` alive after the last stage) or ``--flops``, one required."""
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help=f"fraction of the {tokens} alive after the last stage, in (0, 1]")
    budget.add_argument("--flops", type=float, help="target ratio of the model's analytic FLOPs, in (0, 1]")


def add_run(parser: argparse.ArgumentParser, items: str, batch_size: int) -> None:
    """``--items --batch-size --threads -o`` (``items``: what one test item is)."""
    parser.add_argument("--items", type=int, default=500, help=f"test {items} (default 500)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("-o", "--output", type=Path, help="also write the report (per item too) as JSON here")


def run(args: argparse.Namespace, evaluation: types.ModuleType, setting: Callable[[], Any]) -> int:
    """Evaluate ``setting()`` (built after the cheap checks, so its own errors come before any loading)
    with ``evaluation``'s ``load``, ``evaluate`` and ``format_report``; 0 on success.

    Raises:
        ValueError: an unwritable ``--output``, ``--items`` below 1, or what ``setting`` or the model rejects.
    """
    import torch

    if args.output:
        check_output_file(args.output, "--output")
    if args.items < 1:
        raise ValueError(f"--items must be at least 1, got {args.items}")
    chosen = setting()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = evaluation.load(args.model)
    report = evaluation.evaluate(model, chosen, args.items, args.batch_size, per_item=args.output is not None)
    report["settings"]["model"] = str(args.model)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(evaluation.format_report(report))
    return 0
