"""How much the tiny YOLOS loses when a few background patches leave: mAP with 0, 1, 4, 14 and 34
random background patches (no object pixel) removed after the embeddings, per scene, seeded by the
scene's index. Prints a markdown table (docs/bavit.md).

    python benchmarks/detector_drop_sensitivity.py --items 500
"""

from __future__ import annotations

import argparse

import torch

from tokensieve.detect import data, evaluate, model, prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="tiny-detector")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = model.load(args.detector)
    scenes = data.scenes("test", args.items)
    print("| background patches removed | mAP | mAP@0.5 |")
    print("|---|---|---|")
    for removed in (0, 1, 4, 14, 34):
        results = []
        for i, scene in enumerate(scenes):
            background = (~data.patch_labels([scene], detector.config.patch_size)[0]).nonzero().squeeze(1)
            order = torch.randperm(background.numel(), generator=torch.Generator().manual_seed(i))
            gone = set(background[order[:removed]].tolist())
            grid = (data.IMAGE_SIZE // detector.config.patch_size) ** 2
            kept = torch.tensor([p for p in range(grid) if p not in gone])
            with torch.no_grad(), prune.keep_patches(detector, kept[None]):
                out = detector(data.pixels([scene]))
            results += evaluate.detections(out.logits[0], out.pred_boxes[0], i)
        m = evaluate.coco_map(scenes, results)
        print(f"| {removed} | {m['map']:.3f} | {m['map_50']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
