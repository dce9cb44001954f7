"""``tokensieve train-lvpruning``: train LVPruning's decision modules for a VLM (default: the shipped
tiny LLaVA), the VLM frozen, then measure them on held-out items."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import evaluation, models
from .options import add_runtime_flags, check_output_file


def _numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-lvpruning", help="train LVPruning's decision modules (the VLM frozen)")
    p.add_argument("--model", default="tiny", help="'tiny' (shipped), a LLaVA checkpoint directory or a hub id")
    add_runtime_flags(p)
    p.add_argument("--out", type=Path, required=True, help="the modules' safetensors file to write")
    p.add_argument("--layers", type=_numbers(int), default=(2, 4), help="decoder layers whose input each module prunes")
    p.add_argument("--keep", type=_numbers(float), default=(0.5, 0.1),
                   help="cumulative fraction of the visual tokens kept from each module layer on (training targets)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, linear warmup, cosine decay)")
    p.add_argument("--ratio-weight", type=float, default=2.0, help="weight of the keep-ratio loss")
    p.add_argument("--decisions", default="gumbel", choices=["gumbel", "topk"],
                   help="training decisions: per token by Gumbel-Softmax with the ratio loss (the paper's), or each "
                        "module's target count by Gumbel-top-k (tokensieve's: the budget met by construction)")
    p.add_argument("--pool-per-task", type=int, default=400, help="training items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial.safetensors")
    p.add_argument("--eval-items", type=int, default=100, help="test items per task measured after training (0: none)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..learned.train_lvpruning import train

    check_output_file(args.out, "--out")
    if args.eval_items < 0:
        raise ValueError(f"--eval-items must be >= 0, got {args.eval_items}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = models.load(args.model, args.device, args.dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _, record = train(model, processor, args.layers, args.keep, args.out, args.steps, args.batch_size, args.lr,
                      ratio_weight=args.ratio_weight, pool_per_task=args.pool_per_task, seed=args.seed,
                      resume=args.resume, decisions=args.decisions)
    print(f"trained {record['parameters']} parameters in {record['train_seconds']} s; written to {args.out}")
    if args.eval_items:
        prompting = evaluation.Prompting.for_processor(processor)
        result = evaluation.evaluate(model, prompting, "all", "lvpruning", {"weights": str(args.out)}, args.eval_items)
        summary = {"accuracy": result["accuracy"], "baseline_accuracy": result["baseline_accuracy"],
                   "flops_ratio": result["tflops"] / result["tflops_unpruned"],
                   "per_task": {t: r["accuracy"] for t, r in result["per_task"].items()}}
        command = {k: v for k, v in vars(args).items() if k != "handler"} | {"out": str(args.out)}
        args.out.with_suffix(".json").write_text(json.dumps({"command": command,
                                                             **record, "heldout": summary}, indent=1, default=str) + "\n")
        print(f"held-out accuracy {summary['accuracy']:.3f} (unpruned {summary['baseline_accuracy']:.3f}), "
              f"FLOPs ratio {summary['flops_ratio']:.3f}; record in {args.out.with_suffix('.json')}")
    return 0
