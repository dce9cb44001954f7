"""Layer by layer: does the shipped tiny model's attention point at the answer's evidence?

At each decoder layer L, FitPrune's inference score (text->visual attention x mean visual->visual
attention of layer L, heads maximised) ranks the 144 visual tokens of each test item, the lower
half is removed after layer L, and the share of the evidence patches that survives is reported
(``evidence_coverage.coverage``). A score blind to the evidence keeps about half of it (random keep
0.5 is printed as the reference line); a layer whose attention follows the question keeps nearly all.

    python benchmarks/attention_evidence.py [--ckpt DIR] --limit 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evidence_coverage import coverage
from tokensieve.recipe import Recipe
from tokensieve.tiny import TINY_DIR, load_tiny
from tokensieve.tiny.build import NUM_IMAGE_TOKENS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=TINY_DIR, help="tiny-model checkpoint directory")
    parser.add_argument("--limit", type=int, default=40, help="test items per task")
    parser.add_argument("--batch-size", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = load_tiny(path=args.ckpt)
    layers = model.config.text_config.num_hidden_layers
    rows = {}
    for layer in range(layers - 1):
        recipe = Recipe(removed={layer: NUM_IMAGE_TOKENS // 2}, visual_tokens=NUM_IMAGE_TOKENS, num_layers=layers)
        rows[f"fitprune score, layer {layer}"] = coverage(model, processor, "fitprune", {"recipe": recipe},
                                                          "all", args.limit, args.batch_size)
    rows["random"] = coverage(model, processor, "random", {"keep": 0.5}, "all", args.limit, args.batch_size)
    print("| removed by | evidence kept | " + " | ".join(k for k in rows["random"] if k != "mean") + " |")
    for name, result in rows.items():
        tasks = " | ".join(f"{v['evidence']:.2f}" for k, v in result.items() if k != "mean")
        print(f"| {name} | {result['mean']['evidence']:.2f} | {tasks} |")
    print(json.dumps({"checkpoint": str(args.ckpt), "limit": args.limit,
                      "evidence_kept": {k: v["mean"]["evidence"] for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
