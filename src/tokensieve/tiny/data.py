"""Training data for the tiny model: a pre-generated pool of examples as tensors, and batching."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..tasks import TASKS, generate
from ..tasks.questions import scene_questions
from .auxiliary import box_cells, cell_bits, patch_targets
from .build import CLIP_MEAN, CLIP_STD, NUM_IMAGE_TOKENS
from .prompt import prompt_text

IGNORE_INDEX = -100


@dataclass
class Pool:
    """Pre-generated examples.

    ``pixels``: uint8 (N, 3, H, W); ``ids``: per example the prompt token ids (image
    token already expanded), the answer id and ``</s>``, then any extra turns
    ``USER: q ASSISTANT: a </s>`` about the same image; ``prompt_len``: length of the
    first-turn prompt; ``targets``: positions whose tokens are supervised (answers and their
    ``</s>``); ``task``: (N,) task index; ``answer``: (N,) first answer's token id;
    ``patches``: uint8 (N, 144, 4) per-patch training targets and ``evidence``: per example and
    turn, a bit mask over the 9 cells holding the answer's evidence (see :mod:`.auxiliary`).
    """

    pixels: torch.Tensor
    ids: list[list[int]]
    prompt_len: list[int]
    targets: list[list[int]]
    task: torch.Tensor
    answer: torch.Tensor
    patches: torch.Tensor
    evidence: list[list[int]]


def encode_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of multi-turn texts with ``<image>`` expanded, and the positions right after each
    ``ASSISTANT :`` (the answer) and the one after it (its ``</s>``)."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assistant, colon = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    all_ids, all_targets = [], []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        k = ids.index(image_id)
        ids = ids[:k] + [image_id] * NUM_IMAGE_TOKENS + ids[k + 1 :]
        starts = [j for j in range(2, len(ids)) if ids[j - 2] == assistant and ids[j - 1] == colon]
        all_ids.append(ids)
        all_targets.append([p for j in starts for p in (j, j + 1)])
    return all_ids, all_targets


def build_pool(tokenizer, split: str, per_task: int, start: int = 0, extra_turns: int = 0,
               progress: bool = True, question_first: bool = False) -> Pool:
    """Generate ``per_task`` examples of every task from ``split`` (items ``start`` ..).

    Each example's own question comes first; ``extra_turns`` further questions about the
    same image (any task type, seeded by the example index) follow as extra turns.
    """
    pixels, texts, patches, evidence, task_idx, answers = [], [], [], [], [], []
    for t, task in enumerate(tqdm(TASKS, desc=f"generating {split} pool", disable=not progress)):
        examples = generate(task, split, per_task, start=start)
        images = np.stack([np.asarray(e.image, dtype=np.uint8) for e in examples])
        pixels.append(images)
        patches += [patch_targets(image, e.items).astype(np.uint8) for image, e in zip(images, examples)]
        for i, e in enumerate(examples):
            rng = np.random.default_rng([t, start + i, 7])
            extra = [qa for qa in scene_questions(e.items, rng, extra_turns + 1) if qa[0] != e.question]
            extra = extra[:extra_turns]
            texts.append(f"{prompt_text(e.question, question_first)} {e.answer} </s>"
                         + "".join(f" USER: {q} ASSISTANT: {a} </s>" for q, a, _ in extra))
            evidence.append([cell_bits(box_cells(e.boxes))] + [cell_bits(cells) for _, _, cells in extra])
        task_idx += [t] * per_task
        answers += tokenizer.convert_tokens_to_ids([e.answer for e in examples])
    ids, targets = encode_texts(tokenizer, texts)
    prompt_len = [tg[0] for tg in targets]
    px = torch.from_numpy(np.concatenate(pixels)).permute(0, 3, 1, 2).contiguous()
    return Pool(px, ids, prompt_len, targets, torch.tensor(task_idx), torch.tensor(answers),
                torch.from_numpy(np.stack(patches)), evidence)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 CLIP-normalised pixel values, as the processor computes them."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def collate(pool: Pool, index: torch.Tensor, pad_id: int, with_answer: bool) -> dict[str, torch.Tensor]:
    """Left-padded batch of pool rows ``index``.

    Returns input_ids / attention_mask / position_ids (B, L), pixel_values (B, 3, H, W) and,
    when ``with_answer``, labels (B, L) that are IGNORE_INDEX except on answers and their ``</s>``,
    and, for the training-only heads (pop them before the model call), patch_targets (B, 144, 4)
    and evidence: (row, query position, cell bit mask) per supervised answer, as a (Q, 3) tensor.
    Without the answer, the sequences end at the first prompt (for next-token evaluation).
    """
    rows = index.tolist()
    seqs = [pool.ids[i] if with_answer else pool.ids[i][: pool.prompt_len[i]] for i in rows]
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
        for row, (i, s) in enumerate(zip(rows, seqs)):
            cols = torch.tensor(pool.targets[i]) + (length - len(s))
            labels[row, cols] = input_ids[row, cols]
        batch["labels"] = labels
        batch["patch_targets"] = pool.patches[index].long()
        batch["evidence"] = evidence_queries(pool, rows, [length - len(s) for s in seqs])
    return batch


def evidence_queries(pool: Pool, rows: list[int], offsets: list[int]) -> torch.Tensor:
    """(Q, 3) long: batch row, position of the token that predicts the answer, evidence cell bits;
    one line per answer turn with non-empty evidence. ``offsets``: left padding of each row."""
    lines = [
        (r, pool.targets[i][2 * turn] - 1 + offsets[r], bits)
        for r, i in enumerate(rows)
        for turn, bits in enumerate(pool.evidence[i])
        if bits
    ]
    return torch.tensor(lines, dtype=torch.long).reshape(-1, 3)
