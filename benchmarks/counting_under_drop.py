"""Does the tiny model's count depend on how much background it sees?

For counting test items, chosen visual tokens are removed from decoder layer L on (masked out as
keys, which is the same computation as removing them after layer L - 1, survivors keeping their
positions: ``TokenDrop.applied``), and the next-token answer is compared with the true count.
The drop patterns are method-free, so they separate two causes of counting errors under pruning:
losing an object (``objects half``: half of every object's patches go, one patch of each counted
object always stays) and losing background (``background half``, ``no background``, ``counted
objects only``). Each row reports accuracy and the share of items counted too high / too low.

    python benchmarks/counting_under_drop.py [--ckpt DIR] --limit 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tokensieve.tasks import Example, generate
from tokensieve.tiny import TINY_DIR, build_inputs, load_tiny
from tokensieve.tiny.auxiliary import box_cells, cell_bits, evidence_targets, patch_targets
from tokensieve.tiny.token_drop import TokenDrop, keep_one_per_cell

PATTERNS = ("none", "objects half", "background half", "no background", "counted objects only")


def kept_patches(example: Example, pattern: str, generator: torch.Generator) -> torch.Tensor:
    """(144,) bool: the visual tokens of ``example`` that ``pattern`` keeps."""
    targets = torch.from_numpy(patch_targets(np.asarray(example.image, dtype=np.uint8), example.items))
    occupied = targets[:, 0] > 0
    bits = torch.tensor([cell_bits(box_cells(list(example.boxes)))])
    counted = evidence_targets(targets[None], torch.zeros(1, dtype=torch.long), bits)[0]
    coin = torch.rand(len(targets), generator=generator) < 0.5
    if pattern == "objects half":
        kept = ~occupied | coin
        keep_one_per_cell(kept, counted, targets[:, 3], generator)
        return kept
    return {
        "none": torch.ones_like(occupied),
        "background half": occupied | coin,
        "no background": occupied,
        "counted objects only": counted,
    }[pattern]


@torch.no_grad()
def count_errors(model, processor, examples: list[Example], pattern: str, start: int,
                 batch_size: int) -> dict[str, float]:
    """Accuracy and over-/under-count shares of ``examples`` with ``pattern`` applied from layer ``start``."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    layers = model.model.language_model.layers
    generator = torch.Generator().manual_seed(0)
    errors = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        inputs = build_inputs(processor, chunk)
        visual = inputs["input_ids"] == image_id
        keep = torch.ones_like(visual)
        keep[visual] = torch.stack([kept_patches(e, pattern, generator) for e in chunk]).reshape(-1)
        with TokenDrop.applied(layers, start, keep):
            predicted = tokenizer.convert_ids_to_tokens(model(**inputs).logits[:, -1].argmax(-1).tolist())
        errors += [(int(p) - int(e.answer)) if p.isdigit() else None for p, e in zip(predicted, chunk)]
    n = len(errors)
    return {
        "accuracy": sum(e == 0 for e in errors) / n,
        "over": sum(e is not None and e > 0 for e in errors) / n,
        "under": sum(e is not None and e < 0 for e in errors) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=TINY_DIR, help="tiny-model checkpoint directory")
    parser.add_argument("--limit", type=int, default=200, help="counting test items")
    parser.add_argument("--layers", default="0,1,2", help="comma-separated layers from which the drop applies")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = load_tiny(path=args.ckpt)
    examples = generate("counting", "test", args.limit)
    starts = [int(layer) for layer in args.layers.split(",")]
    table = {f"{pattern}, from layer {start}": count_errors(model, processor, examples, pattern, start, args.batch_size)
             for start in starts for pattern in PATTERNS}
    print("| drop | accuracy | counted too high | too low |")
    for name, row in table.items():
        print(f"| {name} | {row['accuracy']:.3f} | {row['over']:.3f} | {row['under']:.3f} |")
    print(json.dumps({"checkpoint": str(args.ckpt), "limit": args.limit, "rows": table}))


if __name__ == "__main__":
    main()
