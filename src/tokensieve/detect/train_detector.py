"""``tokensieve train-tiny-detector``: train the tiny YOLOS (:mod:`.model`) on the detection scenes
(:mod:`.data`) on a CPU, from scratch, with transformers' own Hungarian loss (DETR's: class
cross-entropy with "no object" weighted ``eos_coefficient``, L1 x5 and generalised IoU x2 on the boxes).

Schedule (step-based, so a run is reproducible from its flags): AdamW (weight decay 1e-4), linear
warm-up then cosine decay, gradients clipped at norm 0.1 (DETR's); step ``s`` trains on train scenes
``seed * 10**7 + s * batch .. + batch - 1``. 
Sparse fine-tuning (BAViT's optional second step; ``--init-from`` a trained detector and
``--sparse-classifier``): the detector trains on what BAViT leaves, step ``s`` at drop level
``drops[s % len(drops)]``, the classifier frozen. A batch must keep one count, so each image keeps its
own patches plus its next least-background ones up to the batch's largest count
(:meth:`.bavit.Drop.kept_batch`); evaluation runs each image alone on exactly its own. The paper
does not say how it fine-tunes: this schedule is tokensieve's choice.

A partial checkpoint (weights, AdamW moments, step,
history, RNG) is written every ``save_every`` steps to ``<out>/partial.safetensors``; ``--resume``
continues from it. The output folder gets the model (``save_pretrained``: ``config.json``,
``model.safetensors``) and ``training_summary.json`` (flags, loss history, time, held-out mAP).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import YolosForObjectDetection

from ..cli import training_flags
from ..learned.fit import fit
from . import bavit, data, model, prune

ITEMS_PER_SEED = 10**7


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tiny-detector", help="train the tiny YOLOS detector on the scene generator on the CPU")
    training_flags.add_schedule(p, "config.json, model.safetensors, training_summary.json", steps=12000, batch_size=16, lr=3e-4, warmup=500)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--detection-tokens", type=int, default=8)
    p.add_argument("--init-from", type=Path, help="start from this trained detector's weights (a folder) instead of scratch")
    p.add_argument("--sparse-classifier", help="fine-tune on the patches this BAViT classifier keeps ('bavit': the shipped one)")
    p.add_argument("--sparse-drops", default="0,0.25,0.5,0.75,1", help="drop levels cycled over the steps of sparse fine-tuning")
    training_flags.add(p, save_every=200, eval_items=500, eval_what="test scenes")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = training_flags.check(args, ("warmup",))
    training_flags.require("scipy", "detect", "transformers' Hungarian loss")
    if args.eval_items:
        training_flags.require("pycocotools", "detect", "the held-out mAP")
    if args.detection_tokens < data.MAX_OBJECTS:
        raise ValueError(f"--detection-tokens must be at least {data.MAX_OBJECTS} (objects per scene), got {args.detection_tokens}")
    drops = _drops(args.sparse_drops)
    if args.sparse_classifier and not args.init_from:
        raise ValueError("--sparse-classifier fine-tunes a trained detector: give it with --init-from")
    if args.init_from:
        start = model.load(args.init_from)
        config = start.config
        initial = start.state_dict()
    else:
        config, initial = model.config(args.hidden, args.layers, args.heads, args.detection_tokens), None
    classifier = bavit.BAViT.load(args.sparse_classifier) if args.sparse_classifier else None
    summary = train(config, args.out, args.steps, args.batch_size, args.lr, args.warmup, args.seed,
                    args.save_every, args.resume, args.eval_items, command, initial=initial,
                    sparse=(classifier, drops) if classifier else None)
    print(f"trained {summary['parameters']} parameters in {summary['train_seconds']} s; written to {args.out}")
    if args.eval_items:
        print(f"held-out mAP {summary['heldout']['map']:.3f} (mAP@0.5 {summary['heldout']['map_50']:.3f}) "
              f"on {args.eval_items} test scenes")
    return 0


def _drops(text: str) -> tuple[float, ...]:
    try:
        drops = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--sparse-drops: expected comma-separated numbers, got {text!r}") from None
    for drop in drops:
        bavit.Drop(drop)
    return drops


def train(config, out: Path, steps: int, batch_size: int = 16, lr: float = 3e-4, warmup: int = 500, seed: int = 0,
          save_every: int = 200, resume: bool = False, eval_items: int = 500, command: dict | None = None,
          progress: bool = True, initial: dict[str, torch.Tensor] | None = None,
          sparse: tuple[bavit.BAViT, tuple[float, ...]] | None = None) -> dict:
    """Train a detector of shape ``config`` (from ``initial`` weights if given, else from scratch) and
    save it to ``out``; the training summary. ``sparse``: a classifier and the drop levels to
    fine-tune on what it keeps.

    Raises:
        ValueError: ``resume`` without a partial checkpoint in ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    detector = model.initialise(YolosForObjectDetection(config))
    if initial is not None:
        detector.load_state_dict(initial)
    detector.train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=1e-4)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = data.scenes("train", batch_size, seed * ITEMS_PER_SEED + step * batch_size)
        pixels = data.pixels(batch)
        if sparse is None:
            output = detector(pixels, labels=data.targets(batch))
        else:
            classifier, drops = sparse
            with torch.no_grad():
                kept = bavit.Drop(drops[step % len(drops)]).kept_batch(classifier.background_probability(pixels))
            with prune.keep_patches(detector, kept):
                output = detector(pixels, labels=data.targets(batch))
        return output.loss, {"loss": float(output.loss.detach())} | {k: float(v.detach()) for k, v in output.loss_dict.items()}

    history, seconds = fit(detector, optimizer, step_loss, out, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                           resume=resume, clip=0.1, desc="train-tiny-detector", progress=progress)
    detector.eval()
    summary = {"command": command or {}, "init_from": (command or {}).get("init_from"),
               "sparse_drops": list(sparse[1]) if sparse else None, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
               "seed": seed, "train_seconds": seconds,
               "parameters": sum(p.numel() for p in detector.parameters()), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "history": history}
    if eval_items:
        from .evaluate import detection_map

        summary["heldout"] = detection_map(detector, eval_items)
        summary["heldout_items"] = eval_items
    detector.save_pretrained(out, safe_serialization=True)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "partial.safetensors").unlink(missing_ok=True)
    return summary
