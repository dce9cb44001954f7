"""ToP on the tiny vision SSM: accuracy against FLOPs for ``aligned`` (ToP), ``naive`` and ``random``
at equal keep and at equal FLOPs, plus the score ablation; writes ``<out>.json`` and prints a markdown
table (``docs/ssm_prune.md``). Each row is what ``tokensieve eval-ssm`` prints for the same flags.

    python benchmarks/ssm_prune_table.py --items 500 -o results/ssm_prune
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokensieve.ssm import evaluate, prune

ROWS = ([("keep", k, m, {}) for k in (0.75, 0.5, 0.3) for m in ("aligned", "naive", "random")]
        + [("flops", f, m, {}) for f in (0.9, 0.8, 0.7) for m in ("aligned", "naive", "random")]
        + [("keep", 0.3, "aligned", {"score": s}) for s in ("sum", "l1", "l2", "random")]
        + [("keep", 0.3, "naive", {"score": s}) for s in ("sum", "l1", "l2")]
        + [("keep", 0.3, "aligned", {"direction": d}) for d in ("forward", "both")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-ssm")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", type=Path, default=Path("results/ssm_prune"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = evaluate.load(args.model)
    cache: dict = {}
    results = []
    for budget, value, method, extra in ROWS:
        setting = prune.SsmPrune(method, **{budget: value}, **extra)
        report = evaluate.evaluate(model, setting, args.items, per_item=False, cache=cache)
        flags = f"--method {method} --{budget} {value}" + "".join(f" --{k} {v}" for k, v in extra.items())
        results.append({"flags": flags, **report})
        print(f"| `{flags}` | {report['accuracy']:.3f} | {report['flops_ratio']:.3f} | "
              f"{report['flops_ratio_survivors_only']:.3f} | {report['tokens_kept']['per_block']} |", flush=True)
    base = results[0]["baseline_accuracy"]
    print(f"unpruned accuracy {base:.3f} on {args.items} items")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"items": args.items, "unpruned_accuracy": base,
                                                         "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
