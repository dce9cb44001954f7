"""Which redundancy a video method removes, on the shipped tiny video VLM.

Every video token covers a 16 x 16 px square of one frame. A token is *static* when its square is
pixel-identical to the same square of the frame before (frame 0's tokens are never static): the
temporal redundancy that EVS, METok's events and frame subsampling go after. Its *evidence* tokens are
those covering the asked object in the question's evidence frames (:func:`tokensieve.tiny_video.data.
evidence_tokens`, as the training pointer sees them). For each method, per task, the share of static,
changed and evidence tokens still alive after the method's first stage that removes any
(``SampleReport.visual_kept``: the encoder for the methods before the LLM, the first pruning layer for
the others), next to the share of all visual tokens alive then (what a method blind to both keeps).

    python benchmarks/video_redundancy.py --limit 40 -o results/video_redundancy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokensieve import prune
from tokensieve.evaluation import Prompting, calibrate_on_tasks
from tokensieve.tasks import VIDEO_QA_TASKS
from tokensieve.tasks.video_questions import VideoExample, generate_video
from tokensieve.tiny_video import build_inputs, load_tiny_video
from tokensieve.tiny_video.data import evidence_tokens

SIDE = 6
"""Video tokens per frame side (6 x 6 per frame after the model's 2 x 2 pooling)."""
ROWS: list[tuple[str, dict]] = [
    ("uniform-frames", {"flops": 0.5}), ("evs", {"flops": 0.5}), ("divprune", {"flops": 0.5}),
    ("divprune", {"flops": 0.5, "scope": "frame"}), ("random", {"flops": 0.5}), ("fastv", {"flops": 0.5}),
    ("pdrop", {"flops": 0.5}), ("fitprune", {"flops": 0.5}), ("metok", {"parts": (1,)}), ("metok", {"parts": (2,)}),
]


def static_tokens(frames: np.ndarray) -> torch.Tensor:
    """``(F * SIDE * SIDE,)`` bool: tokens whose square equals the previous frame's; ``frames``
    ``(F, H, W, 3)`` uint8."""
    f, h, w, c = frames.shape
    squares = frames.reshape(f, SIDE, h // SIDE, SIDE, w // SIDE, c)
    same = (squares[1:] == squares[:-1]).all(axis=(2, 4, 5))  # (F - 1, SIDE, SIDE)
    return torch.from_numpy(np.concatenate([np.zeros((1, SIDE, SIDE), dtype=bool), same])).flatten()


@torch.no_grad()
def shares(model, processor, method: str, options: dict, task: str, limit: int, batch_size: int) -> dict[str, float]:
    """Mean shares of static / changed / evidence / all video tokens alive after the first stage."""
    video_id = model.config.video_token_id
    examples: list[VideoExample] = generate_video(task, "test", limit)
    sums = {"static": 0.0, "changed": 0.0, "evidence": 0.0, "all": 0.0}
    counted = {k: 0 for k in sums}
    for lo in tqdm(range(0, limit, batch_size), desc=f"{method} {task}", leave=False):
        chunk = examples[lo: lo + batch_size]
        inputs = build_inputs(processor, chunk)
        first_video = (inputs["input_ids"] == video_id).int().argmax(-1)
        with prune(model, method, **options) as run:
            model(**inputs, logits_to_keep=1)
        for example, sample, start in zip(chunk, run.report.samples, first_video.tolist()):
            stages = [s for s in sample.visual_kept if s != "input"]
            stage = next((s for s in stages if len(sample.visual_kept[s]) < len(sample.visual_kept["input"])), stages[-1])
            kept = torch.zeros(len(example.frames) * SIDE * SIDE, dtype=torch.bool)
            kept[[p - start for p in sample.visual_kept[stage]]] = True
            static = static_tokens(example.frames)
            groups = {"static": static, "changed": ~static, "all": torch.ones_like(static),
                      "evidence": evidence_tokens(example.clip, example.question, example.evidence_frames, SIDE)}
            for name, mask in groups.items():
                if mask.any():
                    sums[name] += float(kept[mask].float().mean())
                    counted[name] += 1
    return {k: sums[k] / max(1, counted[k]) for k in sums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="test items per task")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--out", type=Path, default=Path("results/video_redundancy.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_tiny_video()
    print("| method | static kept | changed kept | evidence kept | all kept |\n"
          "|---|---|---|---|---|")
    rows = []
    for method, options in ROWS:
        run_options = dict(options)
        if method == "fitprune":  # its recipe for the budget, calibrated as `tokensieve eval --flops` does
            run_options["recipe"] = calibrate_on_tasks(model, Prompting.for_processor(processor), "all",
                                                       options["flops"], model_name="tiny-video")
        per_task = {t: shares(model, processor, method, run_options, t, args.limit, args.batch_size)
                    for t in VIDEO_QA_TASKS}
        mean = {k: sum(v[k] for v in per_task.values()) / len(per_task) for k in ("static", "changed", "evidence", "all")}
        rows.append({"method": method, "options": options, "per_task": per_task, "mean": mean})
        flags = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in options.items())
        print(f"| {method} {flags} | {mean['static']:.2f} | {mean['changed']:.2f} | {mean['evidence']:.2f} | "
              f"{mean['all']:.2f} |", flush=True)
    inputs = [float(static_tokens(e.frames).float().mean()) for t in VIDEO_QA_TASKS
              for e in generate_video(t, "test", args.limit)]
    print(f"static tokens in the input: {sum(inputs) / len(inputs):.3f} of all")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"limit": args.limit, "static_share": sum(inputs) / len(inputs), "rows": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
