"""``tokensieve train-tiny-videomae``: train the tiny VideoMAE classifier (:mod:`tokensieve.video.model`) on
the ``change`` clips (:mod:`tokensieve.video.data`) on a CPU, from scratch (no masked pre-training).

Schedule (step-based, so a run is reproducible from its flags): AdamW (weight decay 0.05, none on
biases and LayerNorms), linear warm-up then cosine decay (:func:`tokensieve.learned.loop.learning_rate`);
step ``s`` trains on train-split clips ``seed * 10**7 + s * batch .. + batch - 1`` (every clip seen
once). Training-only aid (discarded; the checkpoint is the stock class): a grounding probe, a linear
layer on the last hidden states that must tell the clip's class from each *evidence token* (the
tubelets in which the change shows, at the patches of its cells; :func:`tokensieve.video.data.evidence_tokens`),
weighted ``grounding`` (default 1) against the classifier's cross-entropy: without it the mean-pooled
head stayed at chance for 500+ steps (the evidence is 1-3% of the 288 tokens). A partial checkpoint (weights, AdamW moments, step, history, RNG) is written every
``save_every`` steps to ``<out>/partial.safetensors``; ``--resume`` continues from it and gives the
same weights as an uninterrupted run. The output folder gets ``config.json`` and ``model.safetensors``
(``save_pretrained``) and ``training_summary.json`` (flags, loss history, time, parameters, held-out
accuracy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import VideoMAEForVideoClassification

from ..cli import training_flags
from ..learned.fit import adamw, fit
from ..tasks.video import generate_clips
from . import data
from .model import tiny_config

ITEMS_PER_SEED = 10**7


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tiny-videomae", help="train the tiny VideoMAE clip classifier (change class) on the CPU")
    training_flags.add_schedule(p, "config.json, model.safetensors, training_summary.json", steps=2000, batch_size=32, lr=1e-3, warmup=150)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grounding", type=float, default=1.0,
                   help="weight of the training-only grounding probe's loss (0: none; the probe is discarded)")
    training_flags.add(p, save_every=50, eval_items=1000, eval_what="test clips")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = training_flags.check(args, ("hidden", "depth", "heads"))
    if args.grounding < 0:
        raise ValueError(f"--grounding must be >= 0, got {args.grounding}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    _, summary = train(args.out, args.steps, args.batch_size, args.lr, args.warmup, args.seed, args.save_every,
                       args.resume, eval_items=args.eval_items, hidden=args.hidden, depth=args.depth,
                       heads=args.heads, grounding=args.grounding, command=command)
    print(f"trained {summary['parameters']} parameters in {summary['train_seconds']} s; written to {args.out}")
    if args.eval_items:
        print(f"held-out accuracy {summary['heldout_accuracy']:.3f} on {args.eval_items} test clips")
    return 0


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "norm" in name


def train(out: Path, steps: int = 2000, batch_size: int = 32, lr: float = 1e-3, warmup: int = 150, seed: int = 0,
          save_every: int = 50, resume: bool = False, eval_items: int = 1000, hidden: int = 64, depth: int = 6,
          heads: int = 4, grounding: float = 1.0, command: dict | None = None,
          progress: bool = True) -> tuple[VideoMAEForVideoClassification, dict]:
    """Train a classifier of :func:`tiny_config` shape; save it to ``out``. Returns it (eval mode) and the summary.

    Raises:
        ValueError: ``resume`` without a partial checkpoint in ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = VideoMAEForVideoClassification(tiny_config(hidden=hidden, depth=depth, heads=heads)).train()
    probe = torch.nn.Linear(hidden, len(data.LABELS))
    trained = torch.nn.ModuleDict({"model": model, "probe": probe})
    optimizer = adamw(trained, lr, _no_decay)
    last: dict[str, torch.Tensor] = {}  # the last encoder layer's output (B, T * N, d), for the probe
    hook = model.videomae.encoder.layer[-1].register_forward_hook(lambda m, a, out: last.__setitem__("hidden", out))

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        clips = generate_clips(data.TASK, "train", batch_size, seed * ITEMS_PER_SEED + step * batch_size)
        labels = torch.tensor([data.label(c) for c in clips])
        logits = model(pixel_values=data.to_tensor(clips)).logits
        loss = F.cross_entropy(logits, labels)
        if grounding > 0:
            evidence = data.evidence_tokens(clips)
            tokens = probe(last.pop("hidden"))[evidence]
            loss = loss + grounding * F.cross_entropy(tokens, labels[:, None].expand_as(evidence)[evidence])
        return loss, {"loss": float(loss.detach()), "train_accuracy": float((logits.argmax(1) == labels).float().mean())}

    history, seconds = fit(trained, optimizer, step_loss, out, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                           resume=resume, clip=1.0, desc="train-tiny-videomae", progress=progress)
    hook.remove()
    model.eval()
    summary = {"command": command or {}, "task": data.TASK, "labels": list(data.LABELS), "steps": steps,
               "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed, "grounding": grounding,
               "train_seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "history": history}
    if eval_items:
        summary["heldout_accuracy"] = accuracy(model, eval_items)
        summary["heldout_items"] = eval_items
    model.save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "partial.safetensors").unlink(missing_ok=True)
    return model, summary


@torch.no_grad()
def accuracy(model: VideoMAEForVideoClassification, items: int, batch_size: int = 50) -> float:
    """Unpruned accuracy on the first ``items`` test clips."""
    right = 0
    for start in range(0, items, batch_size):
        clips, labels = data.batch("test", min(batch_size, items - start), start)
        right += int((model(pixel_values=clips).logits.argmax(1) == labels).sum())
    return right / items
