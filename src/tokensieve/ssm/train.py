"""``tokensieve train-tiny-ssm``: train the tiny Vim classifier (:mod:`tokensieve.ssm.model`) on the
object-count task (:mod:`tokensieve.ssm.data`) on a CPU, from scratch.

Schedule (step-based, so a run is reproducible from its flags): AdamW (weight decay 0.05, none on
norms, position embeddings and the SSM's ``A_log``/``D``), linear warm-up then cosine decay; step ``s``
trains on train-split items ``seed * 10**7 + s * batch .. + batch - 1`` (every item seen once). The
recurrence runs as mamba.py's parallel scan in training when ``mambapy`` is installed
(:func:`tokensieve.ssm.hf_mamba.set_parallel_scan`); evaluation uses the sequential reference loop.
A partial checkpoint (weights, AdamW moments, step) is written every ``save_every`` steps to
``<out>/partial.safetensors``; ``--resume`` continues from it and gives the same weights as an
uninterrupted run. The output folder gets ``model.safetensors``, ``config.json`` and
``training_summary.json`` (flags, loss history, time, parameters, held-out accuracy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cli import training_flags
from ..learned.fit import adamw, fit
from . import data, hf_mamba
from .model import TinyVim, VimConfig

ITEMS_PER_SEED = 10**7


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tiny-ssm", help="train the tiny Vim-style SSM classifier (object count) on the CPU")
    training_flags.add_schedule(p, "model.safetensors, config.json, training_summary.json", steps=600, batch_size=32, lr=2e-3, warmup=30)
    p.add_argument("--hidden", type=int, default=VimConfig.hidden)
    p.add_argument("--depth", type=int, default=VimConfig.depth)
    p.add_argument("--state", type=int, default=VimConfig.state)
    p.add_argument("--patch", type=int, default=VimConfig.patch)
    p.add_argument("--prune-after", type=_numbers, default=VimConfig.prune_after,
                   help="blocks (0-based) after which ToP prunes (recorded in the config)")
    training_flags.add(p, save_every=50, eval_items=500, eval_what="test items")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = training_flags.check(args)
    config = VimConfig(hidden=args.hidden, depth=args.depth, state=args.state, patch=args.patch,
                       prune_after=tuple(args.prune_after), labels=data.LABELS, classes=len(data.LABELS))
    model, summary = train(config, args.out, args.steps, args.batch_size, args.lr, args.warmup, args.seed,
                           args.save_every, args.resume, eval_items=args.eval_items, command=command)
    print(f"trained {summary['parameters']} parameters in {summary['train_seconds']} s; written to {args.out}")
    if args.eval_items:
        print(f"held-out accuracy {summary['heldout_accuracy']:.3f} on {args.eval_items} test items")
    return 0


def _no_decay(name: str) -> bool:
    return name.endswith(("A_log", "D", "pos_embed", "bias")) or ".norm" in name or name.startswith("norm")


def train(config: VimConfig, out: Path, steps: int = 600, batch_size: int = 32, lr: float = 2e-3, warmup: int = 30,
          seed: int = 0, save_every: int = 50, resume: bool = False, eval_items: int = 500,
          command: dict | None = None, progress: bool = True) -> tuple[TinyVim, dict]:
    """Train a classifier of shape ``config``; save it to ``out``. Returns it (eval mode) and the summary.

    Raises:
        ValueError: ``resume`` without a partial checkpoint in ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TinyVim(config).train()
    optimizer = adamw(model, lr, _no_decay)
    mixers = [m for block in model.blocks for m in (block.forward_mixer, block.backward_mixer)]
    for mixer in mixers:
        hf_mamba.set_parallel_scan(mixer, True)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = data.batch("train", batch_size, seed * ITEMS_PER_SEED + step * batch_size)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": float(loss.detach()), "train_accuracy": float((logits.argmax(1) == labels).float().mean())}

    history, seconds = fit(model, optimizer, step_loss, out, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                           resume=resume, clip=1.0, desc="train-tiny-ssm", progress=progress)
    for mixer in mixers:
        hf_mamba.set_parallel_scan(mixer, False)
    model.eval()
    summary = {"command": command or {}, "task": data.TASK, "labels": list(data.LABELS), "steps": steps,
               "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
               "train_seconds": seconds, "parameters": model.parameter_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "parallel_scan": hf_mamba.is_mambapy_available(), "history": history}
    if eval_items:
        summary["heldout_accuracy"] = accuracy(model, eval_items)
        summary["heldout_items"] = eval_items
    model.save(out, summary)
    (out / "partial.safetensors").unlink(missing_ok=True)
    return model, summary


@torch.no_grad()
def accuracy(model: TinyVim, items: int, batch_size: int = 100) -> float:
    """Unpruned accuracy on the first ``items`` test items."""
    right = 0
    for start in range(0, items, batch_size):
        images, labels = data.batch("test", min(batch_size, items - start), start)
        right += int((model(images).argmax(1) == labels).sum())
    return right / items
