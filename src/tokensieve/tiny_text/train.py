"""Train the shipped tiny text model from scratch on CPU: ``tokensieve train-tiny-text``.

Every step holds about ``--tokens-per-step`` tokens of training-split contexts of one prompt
length, drawn among the lengths the curriculum has opened by then (``--curriculum``: each length
and the step it opens at), the four task kinds equally often. Each context carries its own
question and up to ``--turns`` further ones (``TextExample.more``) as extra turns; the loss is on
the answer tokens and their ``</s>`` only, plus (``--aid-weight``) the training-only retrieval
circuit losses of :mod:`.retrieval`. The schedule depends on steps alone, so a run replays.
Defaults are the settings of the first of the three runs that made the checkpoint in
``tokensieve/tiny_text/checkpoint``; the other two continue it with ``--init-from`` (the commands:
docs/tiny_model.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM

from ..cli.options import check_output_dir
from ..tasks import generate
from ..tasks.text import KINDS, TEXT_LENGTHS, TEXT_TASKS, WARMUP_LENGTHS
from ..tiny.train import uninterrupted
from .build import build_config, build_model, build_tokenizer
from .data import encode
from .evaluate import greedy_accuracy, teacher_forced_correct
from .retrieval import HOP_HEADS, QUESTION_HEAD, circuit_loss, lookups

EVAL_START = 100_000
"""Training-time checks use test items from here on, leaving items 0.. for the final evaluation."""
ITEMS_PER_SEED = 10**9
"""Training-split items of a task used by one ``--seed``: seed s draws items s * 10**9 on."""


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 5% of peak at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def curriculum(text: str) -> dict[int, int]:
    """``"512@0,1024@300,2048@600"`` -> {prompt length: step it opens at} (argparse type of ``--curriculum``)."""
    opens = {}
    try:
        for part in text.split(","):
            length, _, step = part.partition("@")
            opens[int(length)] = int(step)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected length@step pairs, got {text!r}") from None
    if not set(opens) <= set(WARMUP_LENGTHS + TEXT_LENGTHS) or min(opens.values()) != 0:
        raise argparse.ArgumentTypeError(f"lengths must be among {WARMUP_LENGTHS + TEXT_LENGTHS} and one must open at "
                                         f"step 0; got {text!r}")
    return opens


def kind_weights(text: str) -> dict[str, int]:
    """``"vartrack=2"`` -> {task kind: times it comes in each turn of kinds} (argparse type of
    ``--kind-weights``; kinds not named come once)."""
    weights = {}
    try:
        for part in text.split(","):
            kind, _, times = part.partition("=")
            weights[kind.strip()] = int(times)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected kind=times pairs, got {text!r}") from None
    if not set(weights) <= set(KINDS) or min(weights.values()) < 1:
        raise argparse.ArgumentTypeError(f"kinds must be among {', '.join(KINDS)} with times >= 1; got {text!r}")
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (defaults = the shipped checkpoint's settings)."""
    parser.add_argument("--out", type=Path, default=Path("runs/tiny_text"), help="output checkpoint directory")
    parser.add_argument("--steps", type=int, default=2800, help="optimizer steps")
    parser.add_argument("--tokens-per-step", type=int, default=4096,
                        help="context tokens per batch: 32 contexts of 128 tokens ... 8 of 512, 2 of 2048")
    parser.add_argument("--curriculum", type=curriculum, default=curriculum("128@0,256@500,512@1000,1024@1500,2048@1900"),
                        help="prompt lengths and the step each opens at; a step draws its length uniformly among the open ones")
    parser.add_argument("--kind-weights", type=kind_weights, default={},
                        help="kind=times pairs (e.g. vartrack=2): a kind comes that many times in each turn of the "
                             "four kinds (default: each once)")
    parser.add_argument("--turns", type=int, default=8, help="further questions about the same context per sequence")
    parser.add_argument("--aid-weight", type=float, default=1.0,
                        help="weight of the mean retrieval-circuit loss (0 = answers only); see tiny_text/retrieval.py")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the length draws and the training items")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--mlp", type=int, default=384)
    parser.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint instead of fresh weights")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between held-out checks")
    parser.add_argument("--eval-items", type=int, default=16, help="held-out items per task in those checks")
    parser.add_argument("--final-items", type=int, default=100,
                        help="test items 0..N-1 per task for the final greedy accuracy (0 = skip)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train-tiny-text`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser("train-tiny-text", help="train the shipped tiny long-context text model from scratch on CPU")
    add_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Train; exit status 0, or 130 after Ctrl-C (the checkpoint so far and its summary are saved)."""
    from ..cli import INTERRUPTED

    summary = run(args)
    if not summary["interrupted"]:
        return 0
    print(f"\ntokensieve train-tiny-text: interrupted at step {summary['steps_done']} of {args.steps}; "
          f"what was done is in {args.out}", file=sys.stderr)
    return INTERRUPTED


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokensieve.tiny_text.train", description=__doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and train; returns the training summary."""
    return run(parse_args(argv))


class Sampler:
    """Training items in a fixed order: per task a counter over its training split, from
    ``seed * ITEMS_PER_SEED``; per step a length among the open ones from a seeded generator; the
    task kinds in turn, each ``weights.get(kind, 1)`` times per turn."""

    def __init__(self, seed: int, opens: dict[int, int], tokens_per_step: int, weights: dict[str, int] | None = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.turn = [kind for kind in KINDS for _ in range((weights or {}).get(kind, 1))]
        self.next_item = {f"{kind}_{n}": seed * ITEMS_PER_SEED for kind in KINDS for n in opens}
        self.opens = opens
        self.tokens_per_step = tokens_per_step
        self.drawn = 0

    def draw(self, step: int) -> tuple[int, list]:
        """(prompt length, examples) for ``step``: ``tokens_per_step // length`` examples (at least 1),
        task kinds in turn across examples and steps."""
        open_lengths = sorted(n for n, at in self.opens.items() if at <= step)
        length = open_lengths[int(torch.randint(len(open_lengths), (1,), generator=self.generator))]
        examples = []
        for _ in range(max(1, self.tokens_per_step // length)):
            task = f"{self.turn[self.drawn % len(self.turn)]}_{length}"
            examples += generate(task, "train", 1, start=self.next_item[task])
            self.next_item[task] += 1
            self.drawn += 1
        return length, examples


def step_losses(model: LlamaForCausalLM, tokenizer, examples: list, turns: int, aid: bool) -> dict[str, torch.Tensor]:
    """The answer loss of each task kind present (mean cross-entropy over its supervised tokens; logits
    are computed there only) and, when ``aid``, the retrieval-circuit losses (:func:`.retrieval.circuit_loss`)."""
    batch = encode(tokenizer, examples, turns)
    out = model.model(input_ids=batch.input_ids, output_hidden_states=aid)
    tokens = F.cross_entropy(model.lm_head(out.last_hidden_state[batch.rows, batch.cols]), batch.labels, reduction="none")
    kinds = [e.task.rsplit("_", 1)[0] for e in examples]
    row_kind = [kinds[r] for r in batch.rows.tolist()]
    losses = {kind: tokens[torch.tensor([k == kind for k in row_kind])].mean() for kind in KINDS if kind in kinds}
    if aid:
        plans = [lookups(e, turns) for e in examples]
        aids = circuit_loss(model, out.hidden_states, batch.input_ids, plans, batch.rows, batch.cols, kinds)
        losses.update({f"aid_{k}": v for k, v in aids.items()})
    losses["answer"] = tokens.mean()
    return losses


def check(model, tokenizer, eval_sets: dict[str, list]) -> dict[str, float]:
    """Held-out accuracy per task (teacher-forced exact match, equal to greedy's)."""
    model.eval()
    accuracy = {task: teacher_forced_correct(model, tokenizer, examples).float().mean().item()
                for task, examples in eval_sets.items()}
    model.train()
    return accuracy


def save(model, tokenizer, out: Path, summary: dict) -> None:
    """The model (safetensors), tokenizer and ``training_summary.json`` in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    """Train with the parsed options; save the checkpoint and ``training_summary.json`` (settings,
    held-out history, seconds per step by prompt length, final greedy accuracy) in ``args.out``."""
    if args.steps < 1 or args.tokens_per_step < 1 or args.turns < 0:
        raise ValueError("--steps and --tokens-per-step must be positive and --turns non-negative")
    check_output_dir(args.out, "--out")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start_time = time.time()
    tokenizer = build_tokenizer()
    if args.init_from is not None:
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = build_model(build_config(tokenizer, args.hidden, args.layers, args.heads, args.kv_heads, args.mlp))
    model.train()
    if args.aid_weight > 0 and (model.config.num_hidden_layers <= max(l for l, _ in HOP_HEADS)
                                or model.config.num_attention_heads <= QUESTION_HEAD[1]):
        raise ValueError(f"the retrieval aid needs at least {max(l for l, _ in HOP_HEADS) + 1} layers and "
                         f"{QUESTION_HEAD[1] + 1} heads; use --aid-weight 0 for a smaller model")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    sampler = Sampler(args.seed, args.curriculum, args.tokens_per_step, args.kind_weights)
    eval_sets = {task: generate(task, "test", args.eval_items, start=EVAL_START) for task in TEXT_TASKS}
    history: list[dict] = []
    step_times: dict[int, list[float]] = {n: [] for n in WARMUP_LENGTHS + TEXT_LENGTHS}
    running: dict[str, float] = {}  # moving averages of the answer loss per kind and of each aid loss
    step = 0
    interrupted = False
    bar = tqdm(total=args.steps, desc="train-tiny-text", mininterval=10)
    try:
        while step < args.steps:
            tick = time.time()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            length, examples = sampler.draw(step)
            losses = step_losses(model, tokenizer, examples, args.turns, args.aid_weight > 0)
            aids = [v for k, v in losses.items() if k.startswith("aid_")]
            loss = losses["answer"] + (args.aid_weight * torch.stack(aids).mean() if aids else 0.0)
            loss.backward()
            with uninterrupted():  # a checkpoint saved on Ctrl-C holds whole updates only
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            step_times[length].append(time.time() - tick)
            for name, value in losses.items():
                running[name] = 0.95 * running.get(name, value.item()) + 0.05 * value.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running['answer']:.3f}", refresh=False)
            if step % args.eval_every == 0 or step == args.steps:
                history.append({"step": step, "length": length, "losses": dict(running),
                                "elapsed_s": time.time() - start_time, "accuracy": check(model, tokenizer, eval_sets)})
                tqdm.write(json.dumps(history[-1]))
                model.save_pretrained(args.out)  # a snapshot to inspect while training goes on
    except KeyboardInterrupt:
        interrupted = True
    bar.close()
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_done": step,
        "interrupted": interrupted,
        "train_time_s": sum(map(sum, step_times.values())),
        "seconds_per_step": {n: sum(t) / len(t) for n, t in step_times.items() if t},
        "steps_per_length": {n: len(t) for n, t in step_times.items()},
        "heldout_items_per_task": args.eval_items,
        "history": history,
    }
    if step and not interrupted and args.final_items > 0:
        model.eval()
        summary["final_greedy_accuracy"] = {task: greedy_accuracy(model, tokenizer, task, args.final_items)
                                            for task in tqdm(TEXT_TASKS, desc="final greedy accuracy")}
        summary["final_items_per_task"] = args.final_items
    summary["wall_time_s"] = time.time() - start_time
    if step:
        save(model, tokenizer, args.out, summary)
    return summary


if __name__ == "__main__":
    sys.exit(run_command(parse_args()))
