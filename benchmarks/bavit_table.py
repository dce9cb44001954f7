"""BAViT before the tiny YOLOS detector: mAP, patches kept, FLOPs ratio and batch-1 throughput at each
drop level for ``bavit``, the exact-label ``oracle``, and ``random`` and ``attention`` at BAViT's FLOPs;
writes ``<out>.json`` and prints a markdown table (``docs/bavit.md``). Each row is what
``tokensieve eval-detect`` prints for the same flags.

    python benchmarks/bavit_table.py --items 500 -o results/bavit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokensieve.detect import bavit, evaluate, model

DROPS = (0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="tiny-detector")
    parser.add_argument("--classifier", default="bavit")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--throughput-images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", type=Path, default=Path("results/bavit"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector, classifier = model.load(args.detector), bavit.BAViT.load(args.classifier)
    rows = [("none", 0.0)] + [(m, d) for d in DROPS for m in ("bavit", "oracle", "random", "attention")]
    results = []
    print("| method | drop | mAP | mAP@0.5 | patches kept | FLOPs ratio | images/s (batch 1) |")
    print("|---|---|---|---|---|---|---|")
    for method, drop in rows:
        report = evaluate.evaluate(detector, method, drop, classifier, args.items, progress=False)
        report.pop("kept_per_item")
        if method in ("none", "bavit"):
            timing = evaluate.throughput(detector, classifier, drop, images=args.throughput_images)
            report["throughput"] = timing
            speed = timing["detector_images_per_s"] if method == "none" else f"{timing['bavit_detector_images_per_s']} (x{timing['speedup']})"
        else:
            speed = ""
        results.append(report)
        print(f"| {method} | {drop} | {report['map']:.3f} | {report['map_50']:.3f} | {report['patches_kept_mean']:.1f} | "
              f"{report['flops_ratio']:.3f} | {speed} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"items": args.items, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
