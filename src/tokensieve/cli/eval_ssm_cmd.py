"""``tokensieve eval-ssm``: ToP (``aligned``) and ViT-style baselines (``naive``, ``random``) on the tiny
Vim classifier; accuracy, FLOPs ratio and tokens kept per block (:mod:`tokensieve.ssm`)."""

from __future__ import annotations

import argparse

from . import classifier_eval


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..ssm import prune

    p = sub.add_parser("eval-ssm", help="token pruning in the tiny vision SSM (ToP and baselines)")
    p.add_argument("--model", default="tiny-ssm", help="'tiny-ssm' (shipped) or a folder train-tiny-ssm wrote")
    p.add_argument("--method", default="aligned", choices=list(prune.METHODS),
                   help="aligned: ToP (clipped score, pruned tokens kept as zero rows); naive: same score, "
                        "sequence closed up (ViT-style); random: random score, closed up")
    classifier_eval.add_budget(p, "patch tokens")
    p.add_argument("--score", choices=list(prune.SCORES), help="override the method's score")
    p.add_argument("--alignment", choices=list(prune.ALIGNMENTS), help="override the method's alignment")
    p.add_argument("--direction", default="backward", choices=list(prune.DIRECTIONS),
                   help="which scan's gated output the score reads (the release: backward)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random score")
    classifier_eval.add_run(p, "items", batch_size=100)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..ssm import evaluate, prune

    return classifier_eval.run(args, evaluate, lambda: prune.SsmPrune(
        args.method, keep=args.keep, flops=args.flops, score=args.score, alignment=args.alignment,
        direction=args.direction, seed=args.seed))
