"""The video methods on the shipped tiny video VLM: accuracy, FLOPs and KV bytes on the video question
tasks, each row what ``tokensieve eval --model tiny-video --task all`` prints for the same flags (one
unpruned run reused by every row); writes ``<out>.json`` and prints a markdown table
(``docs/benchmarks.md``).

Rows: every temporal and visual baseline at FLOPs targets 0.5 and 0.3 (uniform frame subsampling, EVS,
DivPrune across all frames and per frame, random, FastV, PDrop, FitPrune with a recipe fitted on 64
training items of the video suite as ``tokensieve eval --method fitprune --flops F`` fits it, METok
with its ratio solved); the methods that drop tokens before the LLM again at FLOPs 0.5 with
``positions=keep`` (kept tokens at their original positions instead of renumbered); then METok's
stages alone and together at the release's settings (``ratio`` 0.76), where stage 3's KV bytes show.

    python benchmarks/video_grid.py --limit 100 -o results/video_grid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokensieve import evaluation, models
from tokensieve.tasks import VIDEO_QA_TASKS

AT_FLOPS = [("uniform-frames", {}), ("evs", {}), ("divprune", {}), ("divprune", {"scope": "frame"}), ("random", {}),
            ("fastv", {}), ("pdrop", {}), ("fitprune", {}), ("metok", {})]
ENCODER = [("uniform-frames", {}), ("evs", {}), ("divprune", {}), ("divprune", {"scope": "frame"}), ("random", {}),
           ("metok", {})]
ROWS = ([(m, {**o, "flops": f}) for f in (0.5, 0.3) for m, o in AT_FLOPS]
        + [(m, {**o, "flops": 0.5, "positions": "keep"}) for m, o in ENCODER]
        + [("metok", {"parts": p}) for p in ((1,), (2,), (3,), (1, 2), (1, 2, 3))]
        + [("metok", {"parts": (1,), "positions": "keep"})])


def flags(method: str, options: dict) -> str:
    """The ``tokensieve eval`` flags of a row."""
    text = "".join(f" --{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                   for k, v in options.items())
    return f"--method {method}{text}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-video")
    parser.add_argument("--limit", type=int, default=100, help="test items per task")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--out", type=Path, default=Path("results/video_grid"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = models.load(args.model)
    prompting = evaluation.Prompting.for_processor(processor)
    base = evaluation.evaluate(model, prompting, "all", "none", limit=args.limit, batch_size=args.batch_size)
    kv_full = base["kv_bytes"]
    print("| flags | accuracy | " + " | ".join(t.removeprefix("video-") for t in VIDEO_QA_TASKS)
          + " | FLOPs ratio | KV bytes ratio | visual tokens (mean over layers) |\n|---|"
          + "---|" * (len(VIDEO_QA_TASKS) + 4))
    rows = [{"flags": "--method none", **base}]
    for method, options in [("none", {})] + ROWS:
        result = base if method == "none" else None
        if result is None:
            try:
                run = options
                if method == "fitprune":
                    run = {"recipe": evaluation.calibrate_on_tasks(model, prompting, "all", options["flops"],
                                                                   model_name=args.model, progress=False)}
                result = evaluation.evaluate(model, prompting, "all", method, run, limit=args.limit,
                                             batch_size=args.batch_size, baseline=base)
            except ValueError as err:
                print(f"| `{flags(method, options)}` | out of reach: {err} |", flush=True)
                continue
            rows.append({"flags": flags(method, options), **result})
        ratio = sum(i["flops_ratio"] for i in result["items"]) / len(result["items"])
        tasks = " | ".join(f"{result['per_task'][t]['accuracy']:.3f}" for t in VIDEO_QA_TASKS)
        print(f"| `{flags(method, options)}` | {result['accuracy']:.3f} | {tasks} | {ratio:.3f} | "
              f"{result['kv_bytes'] / kv_full:.3f} | {result['visual_tokens_kept']['mean']:.1f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row.pop("items", None)
        row.pop("timing", None)
    args.out.with_suffix(".json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
