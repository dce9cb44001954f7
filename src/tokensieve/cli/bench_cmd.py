"""``tokensieve bench``: methods x FLOPs budgets on the task suite; JSON, CSV, markdown and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import bench, evaluation, models
from .options import add_protocol_flag, add_runtime_flags, check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="accuracy vs FLOPs / KV-budget grid of methods (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local checkpoint directory or a hub id (offline cache)")
    add_runtime_flags(p)
    p.add_argument("--task", default="all", help="one task name or 'all'")
    p.add_argument("--methods", default="fastv,fitprune,random", help="comma-separated method names, each optionally with fixed options as "
                        "name:key=value[:key=value] (e.g. fitprune:score=fit), which makes a row of its own")
    p.add_argument("--flops", default="0.5,0.3,0.2,0.1",
                   help="comma-separated FLOPs budgets in (0, 1), for the prefill and encoder methods")
    p.add_argument("--keep", default=",".join(map(str, bench.DEFAULT_KEEPS)),
                   help="comma-separated KV budgets in (0, 1] for the cache methods: the fraction of the prompt's "
                        "cache entries kept per layer (kvpress's compression_ratio = 1 - keep)")
    add_protocol_flag(p)
    p.add_argument("--limit", type=int, default=evaluation.TEST_ITEMS, help="test items per task")
    p.add_argument("--batch-size", type=int, default=25, help="samples per forward pass")
    p.add_argument("-o", "--output", type=Path, default=Path("results"),
                   help="folder for results.json/.csv/.md and the plots; a rerun with the same settings resumes from it")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in the output folder: remove the bench files there (other files stay)")
    p.set_defaults(handler=run)


def comma_list(text: str, flag: str) -> list[str]:
    """The entries of a comma-separated flag value; raises ValueError for an empty list or entry."""
    entries = [part.strip() for part in text.split(",")]
    if not any(entries):
        raise ValueError(f"{flag} {text!r} is empty: give one or more, separated by commas")
    if "" in entries:
        raise ValueError(f"{flag} {text!r}: entry {entries.index('') + 1} is empty")
    return entries


def numbers(text: str, flag: str) -> list[float]:
    """The numbers of a comma-separated flag value."""
    out = []
    for entry in comma_list(text, flag):
        try:
            out.append(float(entry))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {entry!r} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    names = comma_list(args.methods, "--methods")
    budgets, keeps = numbers(args.flops, "--flops"), numbers(args.keep, "--keep")
    check_output_dir(args.output, "-o")
    bench.check_specs(names, budgets, models.decoder_layers(args.model) or bench.PROBE_LAYERS, keeps=keeps)
    device = models.resolve_device(args.device)
    suite = models.task_suite(args.model)
    if suite is not None:  # a built-in model: its folder can be checked before it loads
        settings = bench.bench_settings(args.model, args.task, args.limit, args.batch_size,
                                        evaluation.runtime(device, models.resolve_dtype(args.dtype, device)),
                                        suite, args.protocol)
        if not args.overwrite:
            bench.check_folder(args.output, settings)
    model, processor = models.load(args.model, args.device, args.dtype)
    prompting = evaluation.Prompting.for_processor(processor)
    bench.run_bench(model, prompting, args.task, names, budgets, args.limit, args.batch_size, args.output, args.model,
                    overwrite=args.overwrite, keeps=keeps, protocol=args.protocol)
    print((args.output / "results.md").read_text())
    print(f"written: {', '.join(str(args.output / f) for f in bench.OUTPUTS if (args.output / f).is_file())}")
    return 0
