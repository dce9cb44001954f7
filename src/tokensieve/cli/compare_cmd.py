"""``tokensieve compare``: the main job, a short comparison of methods on the shipped model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluation, models
from .eval_cmd import check_method, write_json
from .options import add_method_flags, add_protocol_flag, add_runtime_flags, check_output_file, method_options

SETTINGS: list[tuple[str, dict]] = [
    ("none", {}),
    ("fastv", {"layer": 2, "keep": 0.5}),
    ("fastv", {"layer": 2, "keep": 0.25}),
    ("random", {"keep": 0.5}),
    ("random", {"keep": 0.25}),
    ("pool", {"stride": 2}),
]
VIDEO_SETTINGS: list[tuple[str, dict]] = [
    ("none", {}),
    ("uniform-frames", {"keep": 0.5}),
    ("evs", {"keep": 0.5}),
    ("divprune", {"keep": 0.5, "scope": "frame"}),
    ("fastv", {"layer": 2, "keep": 0.5}),
    ("metok", {}),
]
TEXT_SETTINGS: list[tuple[str, dict]] = [
    ("none", {}),
    ("snapkv", {"keep": 0.5}),
    ("snapkv", {"keep": 0.25}),
    ("h2o", {"keep": 0.25}),
    ("streamingllm", {"keep": 0.25}),
    ("pagedeviction", {"keep": 0.25}),
]
"""The comparison on a text model (the text tasks): KV-cache methods."""
VISUAL = "visual tokens/layer"
FOOTNOTE = (f"{VISUAL}: visual tokens entering each decoder layer during prefill, mean over layers and items "
            "(the unpruned row: all visual tokens of the input); KV KiB: bytes the KV cache holds per sample after "
            "the prefill (of the context, under protocol question-after), measured")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the basic methods on the shipped model (the README's main job)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local checkpoint directory or a hub id (offline cache)")
    p.add_argument("--task", default="all", help="one task name or 'all'")
    add_runtime_flags(p)
    p.add_argument("--limit", type=int, default=40, help="test items per task")
    p.add_argument("--batch-size", type=int, default=20, help="samples per forward pass")
    p.add_argument("--json", type=Path, help="also write all results here")
    add_protocol_flag(p)
    add_method_flags(p, default_method=None, method_help="also compare this method, with the method options below")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    options = method_options(args, args.method)
    fit_first = args.method is not None and check_method(args.method, options)
    evaluation.resolve_tasks(args.task)
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    model, processor = models.load(args.model, args.device, args.dtype)
    prompting = evaluation.Prompting.for_processor(processor)
    settings = list({"text": TEXT_SETTINGS, "video": VIDEO_SETTINGS}.get(prompting.suite, SETTINGS))
    if args.method is not None:
        settings.append((args.method, options))
    if fit_first:
        options["recipe"] = evaluation.calibrate_on_tasks(model, prompting, "all", options["flops"], model_name=args.model)
    results: list[dict] = []
    for method, method_opts in settings:
        baseline = results[0] if results else None
        results.append(evaluation.evaluate(model, prompting, args.task, method, method_opts, args.limit, args.batch_size,
                                           baseline=baseline, protocol=args.protocol))
        results[-1]["settings"]["model"] = args.model
    if args.json:
        write_json(args.json, results)
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """A markdown table of ``results``, after a line naming the model, items, device and dtype, and
    before a footnote saying what the visual column counts."""
    s = results[0]["settings"]
    tasks = s["tasks"]
    title = (f"{s['model']}: {s['limit']} items per task ({', '.join(tasks)}) on {s['device']} in {s['dtype']}; "
             f"protocol {s.get('protocol', 'whole')}")
    head = ["method", "options", "FLOPs ratio", VISUAL, "accuracy", "agreement", *tasks, "TTFT ms", "KV KiB"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["settings"]
        opts = ", ".join(f"{k}={v}" for k, v in s["options"].items() if v is not None)
        cells = [s["method"], opts or "-", f"{r['tflops'] / r['tflops_unpruned']:.3f}", f"{r['visual_tokens_kept']['mean']:.1f}",
                 f"{r['accuracy']:.3f}", f"{r['agreement']:.3f}", *(f"{r['per_task'][t]['accuracy']:.3f}" for t in tasks),
                 f"{r['ttft_ms']:.1f}", f"{r['kv_bytes'] / 1024:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", FOOTNOTE])
