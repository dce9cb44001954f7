"""Train the shipped tiny LLaVA from scratch on CPU: ``python -m tokensieve.tiny.train``.

Defaults are the exact settings used for the checkpoint in ``tokensieve/tiny/checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from ..cli import INTERRUPTED, training_flags
from ..cli.options import check_output_dir
from ..tasks import TASKS
from .auxiliary import EvidencePointer, PatchProbe, evidence_head_loss
from .build import build_model, build_processor
from .data import Pool, build_pool, collate
from .token_drop import TokenDrop

EVAL_START = 100_000
"""Training-time evaluation uses test items from here on, leaving items 0.. for the final evaluation."""


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 5% of peak as
    ``progress`` (fraction of training done, 0..1) goes to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def next_token_accuracy(model, pool: Pool, pad_id: int, batch_size: int) -> dict[str, float]:
    """Per-task accuracy of the first greedy answer token (the whole answer: answers are one word)."""
    model.eval()
    correct = torch.zeros(len(pool.ids), dtype=torch.bool)
    for lo in range(0, len(pool.ids), batch_size):
        index = torch.arange(lo, min(lo + batch_size, len(pool.ids)))
        batch = collate(pool, index, pad_id, with_answer=False)
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        correct[index] = logits.argmax(-1) == pool.answer[index]
    model.train()
    return {task: correct[pool.task == t].float().mean().item() for t, task in enumerate(TASKS)}


def evaluate_and_log(model, pool: Pool, pad_id: int, step: int, running: dict[str, float],
                     start_time: float) -> dict:
    """Held-out next-token accuracy per task, printed as one log line with the running answer loss
    (``running["answer"]``) and auxiliary losses, and returned as a history record."""
    acc = next_token_accuracy(model, pool, pad_id, 64)
    elapsed = time.time() - start_time
    accs = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
    aux = {k: v for k, v in running.items() if k != "answer"}
    losses = " ".join(f"{k} {v:.4f}" for k, v in aux.items())
    tqdm.write(f"step {step} loss {running['answer']:.4f} {losses} elapsed {elapsed:.0f}s acc {accs}")
    return {"step": step, "loss": running["answer"], "aux_losses": aux, "elapsed_s": elapsed, "accuracy": acc}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokensieve.tiny.train", description=__doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (defaults = the shipped checkpoint's settings)."""
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="output checkpoint directory")
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps (at most)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--time-budget-min", type=float, default=80.0,
                        help="if > 0 (0 = off), training progress is also measured in wall-clock minutes of optimisation: "
                             "the schedule follows whichever of steps or time is further along, and training stops "
                             "when either is used up")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--pool-per-task", type=int, default=10_000, help="pre-generated training examples per task")
    parser.add_argument("--extra-turns", type=int, default=6,
                        help="extra questions about the same image per training sequence")
    parser.add_argument("--probe-weight", type=float, default=1.0,
                        help="weight of the training-only per-patch probe loss (0 = answers only); see tiny/auxiliary.py")
    parser.add_argument("--pointer-weight", type=float, default=1.0,
                        help="weight of the training-only evidence pointer loss (0 = off); see tiny/auxiliary.py")
    parser.add_argument("--pointer-layers", type=layer_list, default=[4],
                        help="comma-separated decoder layers whose input hidden states the evidence loss reads "
                             "(one pointer per layer, losses averaged)")
    parser.add_argument("--pointer-head", type=int, default=-1,
                        help="attention head of each of those layers trained to look at the evidence (a grounding head); "
                             "-1 = a separate bilinear scorer that leaves attention alone")
    parser.add_argument("--pointer-until", type=float, default=1.0,
                        help="fraction of training after which the evidence pointer loss is switched off")
    parser.add_argument("--question-first", action="store_true",
                        help="experiment: also ask the question before the image (not the shipped prompt format)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint directory instead of fresh weights (fine-tuning)")
    parser.add_argument("--drop-prob", type=float, default=0.0,
                        help="probability that a batch is trained with visual tokens dropped (see tiny/token_drop.py)")
    parser.add_argument("--drop-max-layer", type=int, default=5,
                        help="latest decoder layer from which dropped tokens are masked out")
    parser.add_argument("--drop-min-keep", type=float, default=0.15,
                        help="lowest share of background visual tokens a dropped batch keeps")
    parser.add_argument("--task-weights", type=task_weights, default={},
                        help="comma-separated task=weight: rows are drawn in proportion to their first question's "
                             "task weight (unlisted tasks weigh 1), e.g. counting=3")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    parser.add_argument("--eval-items", type=int, default=100, help="held-out items per task for those evaluations")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train-tiny`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser("train-tiny", help="train the shipped tiny LLaVA model from scratch on CPU")
    add_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """``tokensieve train-tiny``: train; exit status 0, or 130 after Ctrl-C (the summary is in
    ``args.out``, with the checkpoint so far when a step was done)."""
    summary = run(args)
    if not summary["interrupted"]:
        return 0
    done = summary["steps_done"]
    saved = (f"the checkpoint after {done} steps is in {args.out} (training_summary.json says interrupted; "
             f"--init-from {args.out} trains on from it)" if done else "nothing was saved")
    print(f"\ntokensieve train-tiny: interrupted at step {done} of {args.steps}; {saved}", file=sys.stderr)
    return INTERRUPTED


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and train; returns the training summary."""
    return run(parse_args(argv))


def layer_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (argparse type of ``--pointer-layers``)."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"a layer is listed twice in {text!r}")
    return layers


task_weights = training_flags.task_weights_type(TASKS)
"""``"counting=3,relation=2"`` -> ``{"counting": 3.0, "relation": 2.0}`` (argparse type of ``--task-weights``)."""


def row_weights(task: torch.Tensor, weights: dict[str, float]) -> torch.Tensor | None:
    """(rows,) sampling weight of each pool row, that of its task (``task``: (rows,) index into TASKS;
    tasks missing from ``weights`` weigh 1); None when ``weights`` is empty (uniform draws)."""
    if not weights:
        return None
    return torch.tensor([weights.get(name, 1.0) for name in TASKS])[task]


def draw_rows(rows: int, weights: torch.Tensor | None, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) pool rows out of ``rows``, drawn with replacement: uniformly, or in proportion to
    ``weights`` (rows,)."""
    if weights is None:
        return torch.randint(0, rows, (batch_size,), generator=generator)
    return torch.multinomial(weights, batch_size, replacement=True, generator=generator)


def pointer_losses(model, pointers: nn.ModuleDict, args: argparse.Namespace, hidden_states: tuple[torch.Tensor, ...],
                   batch: dict[str, torch.Tensor], targets: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """Mean evidence loss over ``args.pointer_layers`` (``hidden_states[l]``, (B, L, D), is layer l's
    input): on head ``args.pointer_head`` of each layer's attention, or that layer's bilinear pointer
    if it is -1. The rotary tables, the same for every layer, are computed once."""
    visual = batch["input_ids"] == model.config.image_token_index
    decoder = model.model.language_model
    if args.pointer_head >= 0:
        cos, sin = decoder.rotary_emb(hidden_states[0], batch["position_ids"])
    losses = [
        pointers[str(l)].loss(hidden_states[l], visual, targets, evidence) if args.pointer_head < 0 else
        evidence_head_loss(decoder.layers[l], args.pointer_head, hidden_states[l], cos, sin,
                           batch["attention_mask"], visual, targets, evidence)
        for l in args.pointer_layers
    ]
    return torch.stack(losses).mean()


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block to its end even on Ctrl-C, then raise the KeyboardInterrupt (in the main thread;
    elsewhere signals never arrive anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def save_checkpoint(model, processor, out: Path) -> None:
    """The model and its processor in ``out`` (created), loadable by ``load_tiny(path=out)``."""
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    model.save_pretrained(out)


def run(args: argparse.Namespace) -> dict:
    """Train with the parsed options, save the checkpoint and ``training_summary.json`` in ``args.out``.

    Ctrl-C during the steps ends training early: the checkpoint so far and a summary with
    ``"interrupted": true`` are saved (nothing is written before the first step is done)."""
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    check_output_dir(args.out, "--out")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start_time = time.time()
    processor = build_processor()
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id
    if args.init_from is not None:
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = build_model(tokenizer)
    model.train()
    width = model.config.text_config.hidden_size
    text = model.config.text_config
    if not all(0 <= l < text.num_hidden_layers for l in args.pointer_layers) or args.pointer_head >= text.num_attention_heads:
        raise ValueError(f"--pointer-layers must be in 0..{text.num_hidden_layers - 1} and --pointer-head in "
                         f"-1..{text.num_attention_heads - 1}, got {args.pointer_layers} and {args.pointer_head}")
    if not 0 <= args.drop_max_layer < text.num_hidden_layers:
        raise ValueError(f"--drop-max-layer must be in 0..{text.num_hidden_layers - 1}, got {args.drop_max_layer}")
    drop = TokenDrop(args.drop_prob, args.drop_max_layer, args.drop_min_keep)
    decoder_layers = model.model.language_model.layers
    probe = PatchProbe(width)
    pointers = nn.ModuleDict({str(l): EvidencePointer(width) for l in args.pointer_layers})
    hook = probe.attach(model.model.multi_modal_projector)
    train_pool = build_pool(tokenizer, "train", args.pool_per_task, start=args.seed * args.pool_per_task,
                            extra_turns=args.extra_turns, question_first=args.question_first)
    eval_pool = build_pool(tokenizer, "test", args.eval_items, start=EVAL_START, question_first=args.question_first)
    params = [*model.named_parameters(), *probe.named_parameters(prefix="probe"),
              *pointers.named_parameters(prefix="pointer")]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    generator = torch.Generator().manual_seed(args.seed)
    weights = row_weights(train_pool.task, args.task_weights)
    history = []
    bar = tqdm(total=args.steps, desc="train-tiny", mininterval=10)
    running: dict[str, float] = {}  # moving averages of the answer loss and each auxiliary loss
    train_start = time.time()
    budget_s = args.time_budget_min * 60
    step = 0
    interrupted = False
    try:
        while True:
            progress = step / args.steps
            if budget_s > 0:
                progress = max(progress, (time.time() - train_start) / budget_s)
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, progress, args.lr, args.warmup)
            index = draw_rows(len(train_pool.ids), weights, args.batch_size, generator)
            batch = collate(train_pool, index, pad_id, with_answer=True)
            targets, evidence = batch.pop("patch_targets"), batch.pop("evidence")
            aux: dict[str, torch.Tensor] = {}
            use_pointer = args.pointer_weight > 0 and progress < args.pointer_until
            dropped = drop.sample(batch["input_ids"] == model.config.image_token_index, targets, evidence, generator)
            with TokenDrop.applied(decoder_layers, *dropped) if dropped else nullcontext():
                out = model(**batch, output_hidden_states=use_pointer)
            answer_loss = out.loss
            loss = answer_loss
            if args.probe_weight > 0:
                aux["probe"] = probe.loss(targets)
                loss = loss + args.probe_weight * aux["probe"]
            if use_pointer:
                aux["pointer"] = pointer_losses(model, pointers, args, out.hidden_states, batch, targets, evidence)
                loss = loss + args.pointer_weight * aux["pointer"]
            for name, value in {"answer": answer_loss, **aux}.items():
                value = value.item()
                running[name] = 0.98 * running.get(name, value) + 0.02 * value
            loss.backward()
            with uninterrupted():  # a checkpoint saved on Ctrl-C holds whole updates only
                torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running['answer']:.3f}", refresh=False)
            if step % args.eval_every == 0:
                history.append(evaluate_and_log(model, eval_pool, pad_id, step, running, start_time))
                save_checkpoint(model, processor, args.out)  # a snapshot to inspect while training goes on
    except KeyboardInterrupt:
        interrupted = True
    bar.close()
    hook.remove()
    if not interrupted and (not history or history[-1]["step"] != step):
        history.append(evaluate_and_log(model, eval_pool, pad_id, step, running, start_time))
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "steps_done": step,
        "interrupted": interrupted,
        "wall_time_s": time.time() - start_time,
        "final_heldout_accuracy": history[-1]["accuracy"] if history else None,
        "heldout_items_per_task": args.eval_items,
        "history": history,
    }
    if step:
        save_checkpoint(model, processor, args.out)
        (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(run_command(parse_args()))
