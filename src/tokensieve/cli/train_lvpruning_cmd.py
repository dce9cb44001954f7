"""``tokensieve train-lvpruning``: train LVPruning's decision modules for a VLM (default: the shipped
tiny LLaVA), the VLM frozen, then measure them on held-out items."""

from __future__ import annotations

import argparse

from .learned_training import (
    add_common_flags,
    add_loop_flags,
    measure_heldout,
    numbers,
    prepare,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-lvpruning", help="train LVPruning's decision modules (the VLM frozen)")
    add_common_flags(p, "modules")
    p.add_argument("--layers", type=numbers(int), default=(2, 4), help="decoder layers whose input each module prunes")
    p.add_argument("--keep", type=numbers(float), default=(0.5, 0.1),
                   help="cumulative fraction of the visual tokens kept from each module layer on (training targets)")
    p.add_argument("--ratio-weight", type=float, default=2.0, help="weight of the keep-ratio loss")
    p.add_argument("--decisions", default="gumbel", choices=["gumbel", "topk"],
                   help="training decisions: per token by Gumbel-Softmax with the ratio loss (the paper's), or each "
                        "module's target count by Gumbel-top-k (tokensieve's: the budget met by construction)")
    add_loop_flags(p, steps=400, lr=1e-3)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..learned.train_lvpruning import train

    model, processor = prepare(args)
    _, record = train(model, processor, args.layers, args.keep, args.out, args.steps, args.batch_size, args.lr,
                      ratio_weight=args.ratio_weight, pool_per_task=args.pool_per_task, seed=args.seed,
                      resume=args.resume, decisions=args.decisions)
    print(f"trained {record['parameters']} parameters in {record['train_seconds']} s; written to {args.out}")
    if args.eval_items:
        measure_heldout(args, model, processor, "lvpruning", record)
    return 0
