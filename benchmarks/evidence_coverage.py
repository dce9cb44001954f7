"""How much of the answer's evidence a pruning method keeps, on the shipped tiny model.

For each test item, the evidence patches are the 8x8 vision patches that overlap the ground-truth
boxes of the objects the answer depends on (``Example.boxes``); a method's coverage is the share of
them still alive after its last pruning stage (``SampleReport.visual_kept``), averaged over items.
Next to it, the share of all visual tokens alive after that stage: a method blind to the evidence
(random) keeps the evidence at about that rate, so coverage / kept share above 1 means the method
prefers the evidence.

    python benchmarks/evidence_coverage.py --method fastv --options '{"layer": 2, "keep": 0.5}' --limit 100
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from tokensieve import prune
from tokensieve.evaluation import resolve_tasks
from tokensieve.tasks import Example, generate
from tokensieve.tiny import build_inputs, load_tiny
from tokensieve.tiny.build import NUM_IMAGE_TOKENS, PATCH_SIZE


def evidence_patches(example: Example) -> set[int]:
    """Row-major indices of the patches that overlap the example's evidence boxes (x0, y0, x1, y1)."""
    side = int(NUM_IMAGE_TOKENS**0.5)
    patches = set()
    for x0, y0, x1, y1 in example.boxes:
        for row in range(y0 // PATCH_SIZE, (y1 - 1) // PATCH_SIZE + 1):
            for col in range(x0 // PATCH_SIZE, (x1 - 1) // PATCH_SIZE + 1):
                patches.add(row * side + col)
    return patches


@torch.no_grad()
def coverage(model, processor, method: str, options: dict, task: str, limit: int,
             batch_size: int) -> dict[str, dict[str, float]]:
    """Per task: mean share of evidence patches kept (``evidence``) and of all visual tokens kept
    (``all``) after the last stage; items without evidence boxes are skipped."""
    image_id = model.config.image_token_index
    out: dict[str, dict[str, float]] = {}
    for name in resolve_tasks(task):
        examples = generate(name, "test", limit)
        shares, kept_all = [], []
        for lo in tqdm(range(0, limit, batch_size), desc=f"{method} {name}", leave=False):
            chunk = examples[lo : lo + batch_size]
            inputs = build_inputs(processor, chunk)
            first_visual = (inputs["input_ids"] == image_id).int().argmax(-1)
            with prune(model, method, **options) as run:
                model(**inputs, logits_to_keep=1)
            for example, sample, start in zip(chunk, run.report.samples, first_visual.tolist()):
                wanted = evidence_patches(example)
                if not wanted:
                    continue
                final = min(sample.visual_kept.values(), key=len)
                kept = {p - start for p in final}
                shares.append(len(wanted & kept) / len(wanted))
                kept_all.append(len(kept) / NUM_IMAGE_TOKENS)
        out[name] = {"evidence": sum(shares) / max(1, len(shares)), "all": sum(kept_all) / max(1, len(kept_all))}
    out["mean"] = {k: sum(v[k] for v in out.values()) / len(out) for k in ("evidence", "all")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--options", default="{}", help="method options as JSON")
    parser.add_argument("--task", default="all")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args()
    model, processor = load_tiny()
    result = coverage(model, processor, args.method, json.loads(args.options), args.task, args.limit, args.batch_size)
    print(json.dumps({"method": args.method, "options": json.loads(args.options), "evidence_kept": result}))


if __name__ == "__main__":
    main()
