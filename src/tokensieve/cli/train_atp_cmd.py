"""``tokensieve train-atp``: train ATP's threshold heads for a VLM (default: the shipped tiny LLaVA),
the VLM frozen, to a target average keep; then measure them on held-out items."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import evaluation, models
from .options import add_runtime_flags, check_output_file
from .train_lvpruning_cmd import _numbers


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-atp", help="train ATP's threshold heads (the VLM frozen)")
    p.add_argument("--model", default="tiny", help="'tiny' (shipped), a LLaVA checkpoint directory or a hub id")
    add_runtime_flags(p)
    p.add_argument("--out", type=Path, required=True, help="the heads' safetensors file to write")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops", type=float, help="target prefill FLOPs ratio (mean over the training batches)")
    target.add_argument("--keep", type=float, help="target mean over decoder layers of the fraction of visual tokens each processes")
    p.add_argument("--layers", type=_numbers(int), default=None,
                   help="decoder layers whose attention the modules read (default: 4,14,24 of 32, moved proportionally)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, linear warmup, cosine decay)")
    p.add_argument("--target-weight", type=float, default=2.0, help="weight of |mean keep - target|")
    p.add_argument("--depth-weight", type=float, default=0.05, help="weight of the depth-weighted keep penalty")
    p.add_argument("--pool-per-task", type=int, default=400, help="training items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial.safetensors")
    p.add_argument("--eval-items", type=int, default=100, help="test items per task measured after training (0: none)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..learned.train_atp import train

    check_output_file(args.out, "--out")
    if args.eval_items < 0:
        raise ValueError(f"--eval-items must be >= 0, got {args.eval_items}")
    budget = "flops" if args.flops is not None else "keep"
    target = args.flops if args.flops is not None else args.keep
    if not 0 < target <= 1:
        raise ValueError(f"--{budget} must be in (0, 1], got {target}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = models.load(args.model, args.device, args.dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _, record = train(model, processor, budget, target, args.out, args.layers, args.steps, args.batch_size, args.lr,
                      target_weight=args.target_weight, depth_weight=args.depth_weight,
                      pool_per_task=args.pool_per_task, seed=args.seed, resume=args.resume)
    print(f"trained {record['parameters']} parameters in {record['train_seconds']} s; kept after each module "
          f"{record['kept']} (training-split items); written to {args.out}")
    if args.eval_items:
        prompting = evaluation.Prompting.for_processor(processor)
        result = evaluation.evaluate(model, prompting, "all", "atp", {"weights": str(args.out)}, args.eval_items)
        summary = {"accuracy": result["accuracy"], "baseline_accuracy": result["baseline_accuracy"],
                   "flops_ratio": result["tflops"] / result["tflops_unpruned"],
                   "visual_tokens_kept": result["visual_tokens_kept"],
                   "per_task": {t: r["accuracy"] for t, r in result["per_task"].items()}}
        command = {k: v for k, v in vars(args).items() if k != "handler"} | {"out": str(args.out)}
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, **record, "heldout": summary},
                                                            indent=1, default=str) + "\n")
        print(f"held-out accuracy {summary['accuracy']:.3f} (unpruned {summary['baseline_accuracy']:.3f}), "
              f"FLOPs ratio {summary['flops_ratio']:.3f}; record in {args.out.with_suffix('.json')}")
    return 0
