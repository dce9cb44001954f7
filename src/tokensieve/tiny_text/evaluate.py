"""Accuracy of the tiny text model on held-out items: greedy generation, and its one-pass equivalent."""

from __future__ import annotations

import torch

from ..tasks import generate
from ..tasks.text import TextExample
from .data import encode
from .prompt import MAX_NEW_TOKENS, build_inputs, parse_answers


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: str, n: int, start: int = 0, batch_size: int = 8) -> float:
    """Fraction of test items ``start`` .. ``start + n - 1`` of ``task`` whose greedy answer (left-padded
    batches, ``generate()``) equals the ground truth exactly."""
    examples = generate(task, "test", n, start=start)
    correct = 0
    for lo in range(0, n, batch_size):
        chunk = examples[lo : lo + batch_size]
        inputs = build_inputs(tokenizer, chunk)
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers = parse_answers(tokenizer, out, inputs["input_ids"].shape[1])
        correct += sum(a == e.answer for a, e in zip(answers, chunk))
    return correct / n


@torch.no_grad()
def teacher_forced_correct(model, tokenizer, examples: list[TextExample]) -> torch.Tensor:
    """(B,) bool: whether every answer token and the ``</s>`` after it is the argmax given the
    correct prefix, in one forward pass. This is exactly when greedy decoding yields the answer."""
    batch = encode(tokenizer, examples, turns=0)
    hidden = model.model(input_ids=batch.input_ids).last_hidden_state
    right = model.lm_head(hidden[batch.rows, batch.cols]).argmax(-1) == batch.labels
    wrong = torch.zeros(len(examples), dtype=torch.long).index_add_(0, batch.rows, (~right).long())
    return wrong == 0
