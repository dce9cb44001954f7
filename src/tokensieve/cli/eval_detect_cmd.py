"""``tokensieve eval-detect``: the tiny YOLOS detector with BAViT dropping background patches, against
the exact-label oracle and random dropping; COCO mAP, patches kept, FLOPs ratio, throughput
(:mod:`tokensieve.detect`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..detect.evaluate import METHODS

    p = sub.add_parser("eval-detect", help="BAViT background-token dropping before the tiny YOLOS detector")
    p.add_argument("--detector", default="tiny-detector", help="'tiny-detector' (shipped) or a folder train-tiny-detector wrote")
    p.add_argument("--classifier", default="bavit", help="'bavit' (shipped) or a folder train-bavit wrote")
    p.add_argument("--method", default="bavit", choices=METHODS,
                   help="bavit: drop the classifier's background patches; oracle: the same rule on the exact labels; "
                        "random: patches at random, and attention: layer 0 whole, then the patches the detection tokens "
                        "attended to most, both for the FLOPs BAViT spends; none: every patch")
    p.add_argument("--drop", type=float, default=1.0, help="share of the background patches dropped, in [0, 1] (default 1: all)")
    p.add_argument("--items", type=int, default=500, help="test scenes (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--throughput", action="store_true", help="also time the detector with and without BAViT at batch 1")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-o", "--output", type=Path, help="also write the report (patches kept per scene too) as JSON here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..detect import bavit, evaluate, model
    from .training_flags import require

    require("pycocotools", "detect", "COCO mAP")
    if args.output:
        check_output_file(args.output, "--output")
    if args.items < 1:
        raise ValueError(f"--items must be at least 1, got {args.items}")
    bavit.Drop(args.drop)
    if args.threads:
        torch.set_num_threads(args.threads)
    detector = model.load(args.detector)
    needs_classifier = args.method in ("bavit", "random", "attention") or args.throughput
    classifier = bavit.BAViT.load(args.classifier) if needs_classifier else None
    report = evaluate.evaluate(detector, args.method, args.drop, classifier, args.items, args.seed)
    report["settings"] |= {"detector": str(args.detector), "classifier": str(args.classifier) if classifier else None}
    if args.throughput:
        report["throughput"] = evaluate.throughput(detector, classifier, args.drop)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """A few lines: setting, mAP against unpruned, patches kept, FLOPs ratio, throughput if measured."""
    s = report["settings"]
    lines = [f"{s['method']} drop={s['drop']} on {s['items']} test scenes",
             f"  mAP {report['map']:.3f} (unpruned {report['unpruned']['map']:.3f}), "
             f"mAP@0.5 {report['map_50']:.3f} (unpruned {report['unpruned']['map_50']:.3f})",
             f"  patches kept {report['patches_kept_mean']:.1f} of {s['detector_patches']} "
             f"(min {report['patches_kept_min']}, max {report['patches_kept_max']}), FLOPs ratio {report['flops_ratio']:.3f}"]
    if "throughput" in report:
        t = report["throughput"]
        lines.append(f"  throughput at batch 1: {t['detector_images_per_s']:.1f} images/s unpruned, "
                     f"{t['bavit_detector_images_per_s']:.1f} with BAViT (x{t['speedup']:.3f})")
    return "\n".join(lines)
