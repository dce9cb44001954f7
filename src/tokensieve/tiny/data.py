"""Training data for the tiny model: a pre-generated pool of examples as tensors, and batching."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..tasks import TASKS, Example, generate
from .build import CLIP_MEAN, CLIP_STD, NUM_IMAGE_TOKENS
from .prompt import prompt_text

IGNORE_INDEX = -100


@dataclass
class Pool:
    """Pre-generated examples.

    ``pixels``: uint8 (N, 3, H, W); ``ids``: per example the prompt token ids (image
    token already expanded) followed by the answer id and ``</s>``; ``task``: (N,) task index;
    ``answer``: (N,) answer token id.
    """

    pixels: torch.Tensor
    ids: list[list[int]]
    task: torch.Tensor
    answer: torch.Tensor


def encode_examples(tokenizer, examples: list[Example], with_answer: bool) -> list[list[int]]:
    """Token ids of each example's prompt (and answer + ``</s>`` if ``with_answer``), ``<image>`` expanded."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    texts = [prompt_text(e.question) + (f" {e.answer} </s>" if with_answer else "") for e in examples]
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        k = ids.index(image_id)
        out.append(ids[:k] + [image_id] * NUM_IMAGE_TOKENS + ids[k + 1 :])
    return out


def build_pool(tokenizer, split: str, per_task: int, start: int = 0, progress: bool = True) -> Pool:
    """Generate ``per_task`` examples of every task from ``split`` (items ``start`` ..)."""
    pixels, ids, task_idx, answers = [], [], [], []
    for t, task in enumerate(tqdm(TASKS, desc=f"generating {split} pool", disable=not progress)):
        examples = generate(task, split, per_task, start=start)
        pixels.append(np.stack([np.asarray(e.image, dtype=np.uint8) for e in examples]))
        ids += encode_examples(tokenizer, examples, with_answer=True)
        task_idx += [t] * per_task
        answers += tokenizer.convert_tokens_to_ids([e.answer for e in examples])
    px = torch.from_numpy(np.concatenate(pixels)).permute(0, 3, 1, 2).contiguous()
    return Pool(px, ids, torch.tensor(task_idx), torch.tensor(answers))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 CLIP-normalised pixel values, as the processor computes them."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def collate(pool: Pool, index: torch.Tensor, pad_id: int, with_answer: bool) -> dict[str, torch.Tensor]:
    """Left-padded batch of pool rows ``index``.

    Returns input_ids / attention_mask / position_ids (B, L), pixel_values (B, 3, H, W) and,
    when ``with_answer``, labels (B, L) that are IGNORE_INDEX except on the answer and ``</s>``.
    Without the answer, the sequences end at the prompt (for next-token evaluation).
    """
    seqs = [pool.ids[i] if with_answer else pool.ids[i][:-2] for i in index.tolist()]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, length - len(s) :] = torch.tensor(s)
        mask[row, length - len(s) :] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": normalize(pool.pixels[index]),
    }
    if with_answer:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -2:] = input_ids[:, -2:]
        batch["labels"] = labels
    return batch
