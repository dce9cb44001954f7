"""``tokensieve eval-video-vit``: STA and its baselines (ToMe, random drop) inside the tiny VideoMAE clip
classifier; accuracy, FLOPs ratio and tokens kept per block (:mod:`tokensieve.video`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..video import prune

    p = sub.add_parser("eval-video-vit", help="token pruning inside the tiny video ViT (STA, ToMe, random drop)")
    p.add_argument("--model", default="tiny-videomae", help="'tiny-videomae' (shipped) or a folder train-tiny-videomae wrote")
    p.add_argument("--method", default="sta", choices=list(prune.METHODS),
                   help="sta: semantic-aware temporal accumulation after blocks 0, depth/3, 2 depth/3; tome: bipartite "
                        "merging in every block; random: STA's counts, drawn at random")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help="fraction of the tokens alive after the last stage, in (0, 1]")
    budget.add_argument("--flops", type=float, help="target ratio of the model's analytic FLOPs, in (0, 1]")
    p.add_argument("--schedule", default="constant", choices=list(prune.SCHEDULES), help="ToMe's merges over the blocks")
    p.add_argument("--no-prop-attn", action="store_true", help="ToMe without proportional attention")
    p.add_argument("--seed", type=int, default=0, help="seed of the random drop")
    p.add_argument("--items", type=int, default=500, help="test clips (default 500)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-o", "--output", type=Path, help="also write the report (per item too) as JSON here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..video import evaluate, prune

    if args.output:
        check_output_file(args.output, "--output")
    if args.items < 1:
        raise ValueError(f"--items must be at least 1, got {args.items}")
    setting = prune.VideoPrune(args.method, keep=args.keep, flops=args.flops, seed=args.seed,
                               prop_attn=not args.no_prop_attn, schedule=args.schedule)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = evaluate.load(args.model)
    report = evaluate.evaluate(model, setting, args.items, args.batch_size, per_item=args.output is not None)
    report["settings"]["model"] = str(args.model)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(evaluate.format_report(report))
    return 0
