"""Which patches ToP's score keeps on the tiny vision SSM: the share of object patches (patches with a
non-background pixel) alive after the first and the last pruning stage, with accuracy, per setting
(``docs/ssm_prune.md``).

    python benchmarks/ssm_object_recall.py --items 200
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tokensieve.ssm import data, evaluate, prune
from tokensieve.tasks import generate
from tokensieve.tasks.scene import BACKGROUND

SETTINGS = [("aligned", {}), ("naive", {}), ("random", {}), ("aligned", {"score": "l1"}),
            ("aligned", {"direction": "forward"}), ("aligned", {"score": "random"})]


def object_patches(image, patch: int) -> set[int]:
    pixels = np.abs(np.asarray(image).astype(int) - np.array(BACKGROUND)).sum(-1) > 0
    grid = pixels.shape[0] // patch
    return {r * grid + c for r in range(grid) for c in range(grid)
            if pixels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].any()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-ssm")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = evaluate.load(args.model)
    examples = generate(data.TASK, "test", args.items)
    objects = [object_patches(e.image, model.config.patch) for e in examples]
    images = data.to_tensor([e.image for e in examples])
    labels = torch.tensor([data.label(e) for e in examples])
    print(f"object patches per image {sum(map(len, objects)) / len(objects):.2f} of {model.config.patches}")
    for keep in args.keep:
        for method, extra in SETTINGS:
            logits, kept = prune.run(model, images, prune.SsmPrune(method, keep=keep, **extra), seeds=list(range(args.items)))
            recall = [[len(o & set(k[i].tolist())) / len(o) for i, o in enumerate(objects)] for k in (kept[0], kept[-1])]
            accuracy = float((logits.argmax(1) == labels).float().mean())
            print(f"keep {keep} {method} {extra}: object patches kept {np.mean(recall[0]):.3f} after stage 1, "
                  f"{np.mean(recall[1]):.3f} after the last; accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
