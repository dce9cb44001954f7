"""``tokensieve bench``: methods x FLOPs budgets on the task suite; JSON, CSV, markdown and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import bench, evaluation, models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="accuracy vs FLOPs grid of methods (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local checkpoint directory or a hub id (offline cache)")
    p.add_argument("--task", default="all", help="one task name or 'all'")
    p.add_argument("--methods", default="fastv,fitprune,random", help="comma-separated method names, each optionally with fixed options as "
                        "name:key=value[:key=value] (e.g. fitprune:score=fit), which makes a row of its own")
    p.add_argument("--flops", default="0.5,0.3,0.2,0.1", help="comma-separated FLOPs budgets in (0, 1)")
    p.add_argument("--limit", type=int, default=evaluation.TEST_ITEMS, help="test items per task")
    p.add_argument("--batch-size", type=int, default=25, help="samples per forward pass")
    p.add_argument("-o", "--output", type=Path, default=Path("results"),
                   help="folder for results.json/.csv/.md and the plots; a rerun resumes from it")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    try:
        budgets = [float(x) for x in args.flops.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--flops must be comma-separated numbers, got {args.flops!r}") from None
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    evaluation.resolve_tasks(args.task)
    for b in budgets:
        if not 0 < b < 1:
            raise ValueError(f"FLOPs budgets must be in (0, 1), got {b}")
    for spec in names:
        bench.parse_method(spec)
    model, processor = models.load(args.model)
    prompting = evaluation.Prompting.for_processor(processor)
    bench.run_bench(model, prompting, args.task, names, budgets, args.limit, args.batch_size, args.output, args.model)
    print((args.output / "results.md").read_text())
    print(f"written: {', '.join(str(args.output / f) for f in ('results.json', 'results.csv', 'results.md', 'accuracy_vs_flops.png', 'accuracy_vs_ttft.png'))}")
    return 0
