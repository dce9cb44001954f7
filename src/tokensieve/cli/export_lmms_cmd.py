"""``tokensieve export-lmms-tasks``: the image task suite as lmms-eval tasks (YAML, JSONL and PNG files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluation
from ..integrations.lmms_eval.export import export, task_names
from .options import check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-lmms-tasks", help="write the image tasks as lmms-eval tasks (local files, no hub)",
                       description="Writes OUT/tokensieve_<task>/ (YAML, test.jsonl, PNGs) with test split items "
                                   "0..LIMIT-1 of each task; run them with lmms-eval --include_path OUT "
                                   "--tasks tokensieve_<task> (docs/lmms_eval.md).")
    p.add_argument("--out", type=Path, required=True, help="folder to write the task folders into")
    p.add_argument("--limit", type=int, default=evaluation.TEST_ITEMS,
                   help=f"test items per task (default: the whole split, {evaluation.TEST_ITEMS})")
    p.add_argument("--task", default="all", help="an image task, several joined by commas, or 'all'")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    tasks = task_names(args.task)
    check_output_dir(args.out, "--out")
    written = export(args.out, args.limit, tasks)
    for path in written:
        print(path)
    names = ",".join(path.stem for path in written)
    print(f"run: lmms-eval --model tokensieve --model_args pretrained=tiny --include_path {args.out} --tasks {names}")
    return 0
