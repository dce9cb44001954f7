"""STA on the tiny VideoMAE classifier: accuracy against FLOPs for ``sta``, ``tome`` (constant and
decreasing schedules) and ``random`` at FLOPs targets 0.9, 0.7, 0.5, 0.47 and at equal keep; writes
``<out>.json`` and prints a markdown table (``docs/video_sta.md``). Each row is what ``tokensieve
eval-video-vit`` prints for the same flags.

    python benchmarks/video_sta_table.py --items 1000 -o results/video_sta
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokensieve.video import evaluate, prune

METHODS = [("sta", {}), ("tome", {}), ("tome", {"schedule": "decreasing"}), ("random", {})]
ROWS = ([("flops", f, m, extra) for f in (0.9, 0.7, 0.5, 0.47) for m, extra in METHODS]
        + [("keep", k, m, {}) for k in (0.5, 0.25, 0.125) for m in ("sta", "random")]
        + [("flops", 0.7, "tome", {"prop_attn": False})])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-videomae")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", type=Path, default=Path("results/video_sta"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = evaluate.load(args.model)
    cache: dict = {}
    results = []
    print("| flags | accuracy | agreement | FLOPs ratio | tokens per block (ToMe: after each block's merge) |\n"
          "|---|---|---|---|---|")
    for budget, value, method, extra in ROWS:
        setting = prune.VideoPrune(method, **{budget: value}, **extra)
        try:
            report = evaluate.evaluate(model, setting, args.items, per_item=False, cache=cache)
        except ValueError as err:
            print(f"| `--method {method} --{budget} {value}` | out of reach: {err} | | | |", flush=True)
            continue
        flags = f"--method {method} --{budget} {value}" + "".join(
            " --no-prop-attn" if k == "prop_attn" else f" --{k} {v}" for k, v in extra.items())
        results.append({"flags": flags, **report})
        blocks = report["tokens_kept"]["mlp_per_block" if method == "tome" else "per_block"]
        print(f"| `{flags}` | {report['accuracy']:.3f} | {report['agreement']:.3f} | {report['flops_ratio']:.3f} | "
              f"{blocks} |", flush=True)
    base = results[0]["baseline_accuracy"]
    print(f"unpruned accuracy {base:.3f} on {args.items} clips")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"items": args.items, "unpruned_accuracy": base,
                                                         "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
