"""The flags every command that trains a model whole shares (``train-tiny-ssm``, ``train-tiny-videomae``,
``train-tiny-detector``, ``train-bavit``, ``train-tiny-video``): output folder and schedule, seed, threads,
resume, checkpoint interval, held-out items, and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import check_output_dir


def add_schedule(parser: argparse.ArgumentParser, out: str, *, steps: int, batch_size: int, lr: float, warmup: int) -> None:
    """``--out`` (required; ``out``: what the folder gets) ``--steps --batch-size --lr --warmup`` with
    the command's defaults."""
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {out}")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=warmup)


def add(parser: argparse.ArgumentParser, *, save_every: int, eval_items: int, eval_what: str) -> None:
    """``--seed --threads --resume --save-every --eval-items`` (``eval_what``: what the held-out items are)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/partial.safetensors")
    parser.add_argument("--save-every", type=int, default=save_every)
    parser.add_argument("--eval-items", type=int, default=eval_items, help=f"{eval_what} measured after training (0: none)")


def task_weights_type(tasks: tuple[str, ...]):
    """The argparse type of a ``--task-weights`` flag over ``tasks``: ``"a=3,b=0.5"`` -> ``{"a": 3.0, "b": 0.5}``,
    each task at most once, weights positive."""

    def parse(text: str) -> dict[str, float]:
        weights = {}
        for part in filter(None, text.split(",")):
            name, _, value = part.partition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if name not in tasks or name in weights or not weight > 0:
                raise argparse.ArgumentTypeError(f"expected task=weight pairs over {', '.join(tasks)} with positive "
                                                 f"weights, each task once; got {text!r}")
            weights[name] = weight
        return weights

    return parse


def require(module: str, extra: str, why: str) -> None:
    """Raise ValueError (a one-line command-line error) unless ``module`` can be imported.

    Raises:
        ValueError: ``module`` is not installed; the message names the extra that brings it.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{why} needs {module}: pip install 'tokensieve[{extra}]' (or pip install -e '.[{extra}]')")


def check(args: argparse.Namespace, positive: tuple[str, ...] = ()) -> dict:
    """Check ``--out``, that ``--steps --batch-size --save-every`` and the flags ``positive`` are at least 1,
    ``--eval-items`` at least 0 and ``--lr`` positive; set torch's threads. Returns the command's flags,
    for the training record.

    Raises:
        ValueError: the first flag that fails.
    """
    import torch

    check_output_dir(args.out, "--out")
    for name in ("steps", "batch_size", "save_every", *positive):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_items < 0:
        raise ValueError(f"--eval-items must be >= 0, got {args.eval_items}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"}
