"""``tokensieve calibrate``: fit a FitPrune recipe to a FLOPs budget on the task suite."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluation, models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a FitPrune recipe to a FLOPs budget")
    p.add_argument("--model", default="tiny")
    p.add_argument("--task", default="all", help="calibration task(s): a task name or 'all'")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--flops", type=float, required=True, help="target FLOPs ratio in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="which draw of training items to use")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--visual-only", action="store_true", help="count visual tokens only in FLOPs (the release's convention)")
    p.add_argument("-o", "--output", type=Path, required=True, help="recipe JSON to write")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.flops < 1:
        raise ValueError(f"--flops must be in (0, 1), got {args.flops}")
    evaluation.resolve_tasks(args.task)
    model, processor = models.load(args.model)
    prompting = evaluation.Prompting(processor, tiny=args.model == "tiny")
    recipe = evaluation.calibrate_on_tasks(model, prompting, args.task, args.flops, args.samples, args.seed,
                                           args.batch_size, args.visual_only, model_name=args.model)
    recipe.save(args.output)
    removed = ", ".join(f"{l}:{n}" for l, n in recipe.removed.items())
    print(f"recipe for flops={args.flops}: achieved {recipe.achieved:.4f} on {recipe.samples} samples, "
          f"alpha {recipe.alpha:.4f}, fitted in {recipe.seconds:.1f} s\n  removed per layer {{{removed}}}\n  written to {args.output}")
    return 0
