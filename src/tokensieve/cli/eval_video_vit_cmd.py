"""``tokensieve eval-video-vit``: STA and its baselines (ToMe, random drop) inside the tiny VideoMAE clip
classifier; accuracy, FLOPs ratio and tokens kept per block (:mod:`tokensieve.video`)."""

from __future__ import annotations

import argparse

from . import classifier_eval


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..video import prune

    p = sub.add_parser("eval-video-vit", help="token pruning inside the tiny video ViT (STA, ToMe, random drop)")
    p.add_argument("--model", default="tiny-videomae", help="'tiny-videomae' (shipped) or a folder train-tiny-videomae wrote")
    p.add_argument("--method", default="sta", choices=list(prune.METHODS),
                   help="sta: semantic-aware temporal accumulation after blocks 0, depth/3, 2 depth/3; tome: bipartite "
                        "merging in every block; random: STA's counts, drawn at random")
    classifier_eval.add_budget(p, "tokens")
    p.add_argument("--schedule", default="constant", choices=list(prune.SCHEDULES), help="ToMe's merges over the blocks")
    p.add_argument("--no-prop-attn", action="store_true", help="ToMe without proportional attention")
    p.add_argument("--seed", type=int, default=0, help="seed of the random drop")
    classifier_eval.add_run(p, "clips", batch_size=50)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..video import evaluate, prune

    return classifier_eval.run(args, evaluate, lambda: prune.VideoPrune(
        args.method, keep=args.keep, flops=args.flops, seed=args.seed, prop_attn=not args.no_prop_attn,
        schedule=args.schedule))
