"""Training batches for learned pruners: the image tasks' training items with their answers, and where
in each row the visual tokens and the instruction are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def instruction_rows(input_ids: torch.Tensor, image_id: int, prompt_end: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` long indices of each row's instruction tokens (after its last image token, before
    ``prompt_end[b]``, the answer's index), left-aligned, and ``(B, T)`` bool of which are real."""
    rows = []
    for b in range(input_ids.shape[0]):
        last = int((input_ids[b] == image_id).nonzero().max())
        rows.append(torch.arange(last + 1, prompt_end[b]))
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        index[b, : len(r)], valid[b, : len(r)] = r, True
    return index, valid


@dataclass
class Batch:
    """One training batch: ``inputs`` for the model (labels on the answers), ``visual`` ``(B, N)`` long
    rows of the visual tokens, ``text`` the instruction rows (:func:`instruction_rows`), ``prompt``
    ``(B,)`` each row's prompt length (its tokens before the answer)."""

    inputs: dict[str, torch.Tensor]
    visual: torch.Tensor
    text: tuple[torch.Tensor, torch.Tensor]
    prompt: torch.Tensor


class Batches:
    """Batches of ``per_task`` training items of every image task (items ``start`` on), rows drawn with
    replacement from a generator seeded by ``seed``."""

    def __init__(self, tokenizer: Any, image_id: int, per_task: int, start: int, seed: int, progress: bool = True) -> None:
        from ..tiny.data import build_pool

        self.tokenizer, self.image_id = tokenizer, image_id
        self.pool = build_pool(tokenizer, "train", per_task, start=start, progress=progress)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, batch_size: int) -> Batch:
        from ..tiny.data import collate
        from ..tiny.train import draw_rows

        index = draw_rows(len(self.pool.ids), None, batch_size, self.generator)
        inputs = collate(self.pool, index, self.tokenizer.pad_token_id, with_answer=True)
        inputs.pop("patch_targets"), inputs.pop("evidence")
        ids = inputs["input_ids"]
        visual = torch.stack([(row == self.image_id).nonzero().squeeze(1) for row in ids])
        ends = [self.pool.prompt_len[i] + ids.shape[1] - len(self.pool.ids[i]) for i in index.tolist()]
        prompt = torch.tensor([self.pool.prompt_len[i] for i in index.tolist()])
        return Batch(inputs, visual, instruction_rows(ids, self.image_id, ends), prompt)


def batches_for(model: Any, processor: Any, per_task: int, seed: int, progress: bool = True) -> Callable[[int], Batches]:
    """The batches of a training run of ``seed`` on ``model``'s image tasks: ``per_task`` items of each
    from item ``seed * per_task`` on, rows drawn by a generator seeded by ``seed + step`` (``step``: where
    a resumed run starts)."""
    def make(step: int) -> Batches:
        return Batches(processor.tokenizer, model.config.image_token_index, per_task, seed * per_task, seed + step, progress)
    return make
