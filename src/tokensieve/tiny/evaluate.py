"""Unpruned greedy accuracy of the tiny model on held-out test items."""

from __future__ import annotations

import torch

from ..tasks import generate
from . import build_inputs, parse_answers


@torch.no_grad()
def evaluate_unpruned(model, processor, task: str, n: int = 500, batch_size: int = 50,
                      max_new_tokens: int = 3) -> float:
    """Fraction of test items 0..n-1 of ``task`` whose greedy answer equals the ground truth."""
    examples = generate(task, "test", n)
    correct = 0
    for lo in range(0, n, batch_size):
        chunk = examples[lo : lo + batch_size]
        inputs = build_inputs(processor, chunk)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = parse_answers(processor.tokenizer, out, inputs["input_ids"].shape[1])
        correct += sum(a == e.answer for a, e in zip(answers, chunk))
    return correct / n
