"""``tokensieve eval-ssm``: ToP (``aligned``) and ViT-style baselines (``naive``, ``random``) on the tiny
Vim classifier; accuracy, FLOPs ratio and tokens kept per block (:mod:`tokensieve.ssm`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..ssm import prune

    p = sub.add_parser("eval-ssm", help="token pruning in the tiny vision SSM (ToP and baselines)")
    p.add_argument("--model", default="tiny-ssm", help="'tiny-ssm' (shipped) or a folder train-tiny-ssm wrote")
    p.add_argument("--method", default="aligned", choices=list(prune.METHODS),
                   help="aligned: ToP (clipped score, pruned tokens kept as zero rows); naive: same score, "
                        "sequence closed up (ViT-style); random: random score, closed up")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help="fraction of the patch tokens alive after the last stage, in (0, 1]")
    budget.add_argument("--flops", type=float, help="target ratio of the model's analytic FLOPs, in (0, 1]")
    p.add_argument("--score", choices=list(prune.SCORES), help="override the method's score")
    p.add_argument("--alignment", choices=list(prune.ALIGNMENTS), help="override the method's alignment")
    p.add_argument("--direction", default="backward", choices=list(prune.DIRECTIONS),
                   help="which scan's gated output the score reads (the release: backward)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random score")
    p.add_argument("--items", type=int, default=500, help="test items (default 500)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-o", "--output", type=Path, help="also write the report (per item too) as JSON here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..ssm import evaluate, prune

    if args.output:
        check_output_file(args.output, "--output")
    if args.items < 1:
        raise ValueError(f"--items must be at least 1, got {args.items}")
    setting = prune.SsmPrune(args.method, keep=args.keep, flops=args.flops, score=args.score,
                             alignment=args.alignment, direction=args.direction, seed=args.seed)
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
