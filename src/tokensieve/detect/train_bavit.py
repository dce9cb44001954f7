"""``tokensieve train-bavit``: train the BAViT classifier (:mod:`.bavit`) on the scenes' exact object
masks, on a CPU, from scratch.

Loss: the cross-entropy of every patch token's foreground/background label, averaged over the images
and tokens of a batch (the paper's accumulated token cross-entropy; no class weights). Schedule
(step-based, reproducible from the flags): AdamW (weight decay 0.05), linear warm-up then cosine decay;
step ``s`` trains on train scenes ``seed * 10**7 + s * batch .. + batch - 1``. Resumable from
``<out>/partial.safetensors`` (``--resume``). The folder gets the ViT (``config.json``, ``model.safetensors``), ``head.safetensors``
and ``record.json`` (flags, loss history, time, held-out token accuracy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cli import training_flags
from ..learned.fit import fit
from . import bavit, data

ITEMS_PER_SEED = 10**7


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-bavit", help="train the BAViT foreground/background token classifier on the CPU")
    training_flags.add_schedule(p, "the ViT (config.json, model.safetensors), head.safetensors, record.json",
                                steps=1500, batch_size=32, lr=1e-3, warmup=100)
    p.add_argument("--layers", type=int, default=2, help="ViT layers (the paper: 2, or 10)")
    p.add_argument("--hidden", type=int, default=64, help="width (the detector's is 128)")
    p.add_argument("--heads", type=int, default=2)
    training_flags.add(p, save_every=100, eval_items=500, eval_what="test scenes")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = training_flags.check(args, ("layers", "warmup"))
    record = train(bavit.config(args.layers, args.hidden, args.heads), args.out, args.steps, args.batch_size, args.lr,
                   args.warmup, args.seed, args.save_every, args.resume, args.eval_items, command)
    print(f"trained {record['parameters']} parameters in {record['train_seconds']} s; written to {args.out}")
    if args.eval_items:
        h = record["heldout"]
        print(f"held-out token accuracy {h['accuracy']:.3f} (foreground recall {h['foreground_recall']:.3f}, "
              f"background recall {h['background_recall']:.3f}) on {args.eval_items} test scenes")
    return 0


def train(vit_config, out: Path, steps: int, batch_size: int = 32, lr: float = 1e-3, warmup: int = 100, seed: int = 0,
          save_every: int = 100, resume: bool = False, eval_items: int = 500, command: dict | None = None,
          progress: bool = True) -> dict:
    """Train a classifier of shape ``vit_config`` and save it to ``out``; its record.

    Raises:
        ValueError: ``resume`` without a partial checkpoint in ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = bavit.BAViT(vit_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = data.scenes("train", batch_size, seed * ITEMS_PER_SEED + step * batch_size)
        labels = data.patch_labels(batch, vit_config.patch_size, bavit.FOREGROUND_SHARE).long()
        loss = F.cross_entropy(model(data.pixels(batch)).flatten(0, 1), labels.flatten())
        return loss, {"loss": float(loss.detach())}

    history, seconds = fit(model, optimizer, step_loss, out, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                           resume=resume, clip=None, desc="train-bavit", progress=progress)
    model.eval()
    record = {"command": command or {}, "layers": vit_config.num_hidden_layers, "steps": steps, "batch_size": batch_size,
              "lr": lr, "warmup": warmup, "seed": seed, "foreground_share": bavit.FOREGROUND_SHARE,
              "train_seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "history": history}
    if eval_items:
        record["heldout"] = token_accuracy(model, eval_items)
        record["heldout_items"] = eval_items
    model.save(out, record)
    (out / "partial.safetensors").unlink(missing_ok=True)
    return record


@torch.no_grad()
def token_accuracy(model: bavit.BAViT, items: int, batch_size: int = 100) -> dict[str, float]:
    """Accuracy of the background decision (probability > 0.5) over all patch tokens of test scenes
    ``0 .. items - 1``, and the recall of each class."""
    right = fg_right = fg = bg_right = bg = 0
    for first in range(0, items, batch_size):
        batch = data.scenes("test", min(batch_size, items - first), first)
        truth = data.patch_labels(batch, model.vit.config.patch_size, bavit.FOREGROUND_SHARE)
        said_foreground = model.background_probability(data.pixels(batch)) <= 0.5
        right += int((said_foreground == truth).sum())
        fg_right += int((said_foreground & truth).sum())
        bg_right += int((~said_foreground & ~truth).sum())
        fg += int(truth.sum())
        bg += int((~truth).sum())
    return {"accuracy": round(right / (fg + bg), 4), "foreground_recall": round(fg_right / max(fg, 1), 4),
            "background_recall": round(bg_right / max(bg, 1), 4), "foreground_share": round(fg / (fg + bg), 4)}
