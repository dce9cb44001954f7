"""``tokensieve eval``: a method's accuracy, FLOPs, latency and KV memory on the task suite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import evaluation, methods, models
from ..recipe import Recipe
from .options import add_method_flags, add_protocol_flag, add_runtime_flags, check_output_file, method_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a method on the task suite against the unpruned model")
    p.add_argument("--model", default="tiny", help="'tiny' (shipped), a checkpoint directory or a hub id")
    p.add_argument("--task", default="all", help="a task name or 'all'")
    add_runtime_flags(p)
    p.add_argument("--limit", type=int, default=evaluation.TEST_ITEMS, help="test items per task (default: the whole split, 500)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--options", type=Path, help='method options from a JSON file ({"options": {...}} as `calibrate --method vflowopt` writes)')
    p.add_argument("--json", type=Path, help="also write the result here")
    add_protocol_flag(p)
    add_method_flags(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    options = {**load_options(args.options), **method_options(args, args.method)}
    evaluation.resolve_tasks(args.task)
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    fit_first = check_method(args.method, options)
    model, processor = models.load(args.model, args.device, args.dtype)
    prompting = evaluation.Prompting.for_processor(processor)
    if fit_first:
        options["recipe"] = evaluation.calibrate_on_tasks(model, prompting, "all", options["flops"], model_name=args.model)
    result = evaluation.evaluate(model, prompting, args.task, args.method, options, args.limit, args.batch_size,
                                 protocol=args.protocol)
    result["settings"]["model"] = args.model
    if args.json:
        write_json(args.json, result)
    print(format_result(result))
    return 0


def check_method(method: str, options: dict) -> bool:
    """Check ``method`` and ``options`` before any model loads, loading a ``recipe`` file in place;
    True when fitprune must first calibrate a recipe to ``options["flops"]`` on the task suite."""
    fit_first = method == "fitprune" and "recipe" not in options
    if fit_first and "flops" not in options:
        raise ValueError("fitprune needs --recipe FILE or --flops RATIO (which calibrates on the task suite first)")
    if fit_first and not 0 < options["flops"] < 1:
        raise ValueError(f"--flops must be in (0, 1), got {options['flops']}")
    if "recipe" in options:
        options["recipe"] = Recipe.load(options["recipe"])
    if not fit_first:
        methods.get(method, **options)
    return fit_first


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON, creating the folder (the path was checked before any work)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def format_result(result: dict) -> str:
    s = result["settings"]
    protocol = "" if s.get("protocol", "whole") == "whole" else f"; protocol {s['protocol']}"
    lines = [f"{s['method']} {s['options']} on {', '.join(s['tasks'])} ({result['samples']} items; {s['model']} "
             f"on {s['device']} in {s['dtype']}{protocol})"]
    for task, r in result["per_task"].items():
        lines.append(f"  {task:<10} accuracy {r['accuracy']:.3f}  unpruned {r['baseline_accuracy']:.3f}  agreement {r['agreement']:.3f}")
    lines.append(f"  accuracy {result['accuracy']:.3f} (unpruned {result['baseline_accuracy']:.3f}), agreement {result['agreement']:.3f}")
    lines.append(f"  visual tokens kept (mean over layers) {result['visual_tokens_kept']['mean']:.1f}; "
                 f"TFLOPs {result['tflops']:.5f} of {result['tflops_unpruned']:.5f} ({result['tflops'] / result['tflops_unpruned']:.3f})")
    lines.append(f"  TTFT {result['ttft_ms']:.1f} ms (unpruned {result['ttft_ms_unpruned']:.1f}); "
                 f"decode {result['decode_ms_per_token'] or 0:.1f} ms/token; KV {result['kv_bytes'] / 1024:.1f} KiB/sample")
    return "\n".join(lines)


def load_options(path: Path | None) -> dict:
    """Options from a JSON file: either ``{"options": {...}}`` or a plain object of options."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read options from {path}: {err}") from None
    data = data.get("options", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object of options")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
