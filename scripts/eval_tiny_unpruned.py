"""Unpruned greedy accuracy of the tiny model on held-out test items 0..n-1 of every task.

    python scripts/eval_tiny_unpruned.py [--ckpt DIR] [--n 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokensieve.tasks import TASKS
from tokensieve.tiny import TINY_DIR, load_tiny
from tokensieve.tiny.evaluate import evaluate_unpruned


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=TINY_DIR)
    parser.add_argument("--n", type=int, default=500, help="test items per task")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the accuracies here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_tiny(path=args.ckpt)
    start = time.time()
    acc = {task: evaluate_unpruned(model, processor, task, args.n, args.batch_size) for task in TASKS}
    acc["mean"] = sum(acc[t] for t in TASKS) / len(TASKS)
    print(f"| task | accuracy ({args.n} test items) |\n|---|---|")
    for task, value in acc.items():
        print(f"| {task} | {100 * value:.1f}% |")
    print(f"evaluated in {time.time() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"n_per_task": args.n, "accuracy": acc}, indent=2) + "\n")
    return acc


if __name__ == "__main__":
    main()
