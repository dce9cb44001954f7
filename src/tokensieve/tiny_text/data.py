"""Training batches for the tiny text model: a context with several questions, loss on the answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks.text import SUFFIX, TextExample


@dataclass
class Batch:
    """Right-padded token ids and the supervised positions.

    ``input_ids``: (B, L); ``rows``, ``cols``: (N,) the batch row and position of each hidden
    state that predicts a supervised token (an answer word or the ``</s>`` after it), ``labels``:
    (N,) that token. Right padding needs no attention mask under a causal model: no real token
    attends to the padding after it.
    """

    input_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor


def training_text(example: TextExample, turns: int) -> str:
    """The prompt, its answer and ``</s>``, then the first ``turns`` of ``example.more`` as further
    turns ``USER : q ASSISTANT : a </s>`` about the same context."""
    extra = "".join(f" USER : {q} {' '.join(SUFFIX)} {a} </s>" for q, a, _ in example.more[:turns])
    return f"{example.prompt} {example.answer} </s>{extra}"


def encode(tokenizer, examples: list[TextExample], turns: int) -> Batch:
    """The batch of ``training_text(e, turns)`` for ``examples``; every answer token and each
    answer's ``</s>`` are supervised (with ``turns=0``: the prompt's own answer only)."""
    assistant, colon, eos, pad = tokenizer.convert_tokens_to_ids([*SUFFIX, "</s>", "<pad>"])
    seqs = tokenizer([training_text(e, turns) for e in examples], add_special_tokens=False)["input_ids"]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    rows, cols = [], []
    for r, seq in enumerate(seqs):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        answering = False
        for j in range(2, len(seq)):
            if seq[j - 2] == assistant and seq[j - 1] == colon:
                answering = True
            if answering:
                rows.append(r)
                cols.append(j - 1)
            if seq[j] == eos:
                answering = False
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    return Batch(input_ids, rows_t, cols_t, input_ids[rows_t, cols_t + 1])
