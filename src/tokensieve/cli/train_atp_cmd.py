"""``tokensieve train-atp``: train ATP's threshold heads for a VLM (default: the shipped tiny LLaVA),
the VLM frozen, to a FLOPs or keep target met on average; then measure them on held-out items."""

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
    p = sub.add_parser("train-atp", help="train ATP's threshold heads (the VLM frozen)")
    add_common_flags(p, "heads")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops", type=float, help="target prefill FLOPs ratio (mean over the training batches)")
    target.add_argument("--keep", type=float,
                        help="target mean over decoder layers of the fraction of visual tokens each processes")
    p.add_argument("--layers", type=numbers(int), default=None,
                   help="decoder layers whose attention the modules read (default: 4,14,24 of 32, moved proportionally)")
    p.add_argument("--target-weight", type=float, default=2.0, help="weight of |batch mean budget - target|")
    p.add_argument("--depth-weight", type=float, default=0.05, help="weight of the depth-weighted keep penalty")
    p.add_argument("--masks", default="soft", choices=["soft", "straight-through"],
                   help="training masks: the paper's soft sigmoids, or the inference rule's hard decisions with "
                        "the soft gradient (tokensieve's)")
    add_loop_flags(p, steps=300, lr=3e-3)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..learned.train_atp import train

    budget = "flops" if args.flops is not None else "keep"
    target = args.flops if args.flops is not None else args.keep
    if not 0 < target <= 1:
        raise ValueError(f"--{budget} must be in (0, 1], got {target}")
    model, processor = prepare(args)
    _, record = train(model, processor, budget, target, args.out, args.layers, args.steps, args.batch_size, args.lr,
                      target_weight=args.target_weight, depth_weight=args.depth_weight,
                      pool_per_task=args.pool_per_task, seed=args.seed, resume=args.resume, masks=args.masks)
    print(f"trained {record['parameters']} parameters in {record['train_seconds']} s; kept after each module "
          f"{record['kept']} (training-split items); written to {args.out}")
    if args.eval_items:
        measure_heldout(args, model, processor, "atp", record)
    return 0
