"""What the training commands of learned pruners share (``train-lvpruning``, ``train-atp``): their
common flags, the checks before the model loads, and the held-out measurement written beside the
weights as ``<out>.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .. import evaluation, models
from .options import add_runtime_flags, check_output_file


def numbers(kind):
    """An argparse type: comma-separated ``kind`` values as a tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def add_common_flags(p: argparse.ArgumentParser, what: str) -> None:
    """The model, runtime and output flags; ``what`` names the file ``--out`` writes."""
    p.add_argument("--model", default="tiny", help="'tiny' (shipped), a LLaVA checkpoint directory or a hub id")
    add_runtime_flags(p)
    p.add_argument("--out", type=Path, required=True, help=f"the {what}' safetensors file to write")


def add_loop_flags(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """The training loop's flags (``steps`` and ``lr``: this command's defaults) and ``--eval-items``."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, linear warmup, cosine decay)")
    p.add_argument("--pool-per-task", type=int, default=400, help="training items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial.safetensors")
    p.add_argument("--eval-items", type=int, default=100, help="test items per task measured after training (0: none)")


def prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    """Check the output and counts, set the threads, load the model (an image VLM): ``(model, processor)``."""
    check_output_file(args.out, "--out")
    if args.eval_items < 0:
        raise ValueError(f"--eval-items must be >= 0, got {args.eval_items}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = models.load(args.model, args.device, args.dtype)
    suite = evaluation.Prompting.for_processor(processor).suite
    if suite != "image":
        raise ValueError(f"--model {args.model} runs the {suite} tasks; the learned pruners train and are measured "
                         f"on the image tasks, so give an image VLM (e.g. --model tiny)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return model, processor


def measure_heldout(args: argparse.Namespace, model: Any, processor: Any, method: str, record: dict) -> None:
    """Evaluate ``method`` with the new weights on ``--eval-items`` test items per task and write the
    command, the training record and the result to ``<out>.json``."""
    prompting = evaluation.Prompting.for_processor(processor)
    result = evaluation.evaluate(model, prompting, "all", method, {"weights": str(args.out)}, args.eval_items)
    summary = {"accuracy": result["accuracy"], "baseline_accuracy": result["baseline_accuracy"],
               "flops_ratio": result["tflops"] / result["tflops_unpruned"],
               "visual_tokens_kept": result["visual_tokens_kept"],
               "per_task": {t: r["accuracy"] for t, r in result["per_task"].items()}}
    command = {k: v for k, v in vars(args).items() if k != "handler"} | {"out": str(args.out)}
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, **record, "heldout": summary},
                                                        indent=1, default=str) + "\n")
    print(f"held-out accuracy {summary['accuracy']:.3f} (unpruned {summary['baseline_accuracy']:.3f}), "
          f"FLOPs ratio {summary['flops_ratio']:.3f}; record in {args.out.with_suffix('.json')}")
