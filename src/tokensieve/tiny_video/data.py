"""Training batches of the tiny video VLM, generated on the fly from the train split.

Item ``g`` of a run (``g = step * batch + row``) is train item ``g // 5`` of task ``VIDEO_QA_TASKS[g % 5]``
(with task weights: train item ``g`` of a task drawn in proportion to them, by an RNG seeded by ``g``);
its sequence is the item's question, then up to ``extra_turns`` further questions about the same clip
(in an order seeded by ``g``), each ``USER: q ASSISTANT: a </s>``; every answer and its ``</s>`` is
supervised. For the training-only evidence pointer (:mod:`.train`), each answer turn also names its
evidence: the video tokens that cover the asked objects (the one or two the question names) in the
question's evidence frames, where they are visible. For the training-only copy head, each order turn
names the question's shape token of the answered object: the word the answer's second token repeats. With
``balanced_count``, a count item's answer is fixed (1, 2, 3 in turn by item index) before its clip
(:func:`balanced_count_item`): the test split's answers are about 62% "1", 34% "2" and 4% "3", and a
model trained on that prior never answered "3".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..tasks.scene import IMAGE_SIZE, OBJECT_SIZE
from ..tasks.video import Clip, questions, story
from ..tasks.video_questions import VIDEO_QA_TASKS, VideoExample, generate_video, kind, video_seed
from ..tiny.data import IGNORE_INDEX, normalize
from . import prompt_text


COUNT_ANSWERS = ("1", "2", "3")


def balanced_count_item(index: int) -> VideoExample:
    """Train item ``index`` of ``video-count`` with its answer fixed first: answer ``index % 3`` of
    :data:`COUNT_ANSWERS` (so every three consecutive items hold each answer once), then, from an RNG
    seeded by the item's seed and 17, ``story`` clips until one holds a count question with that answer
    (one of them, uniformly), as ``video-end`` draws its answer first. A training-only distribution: the
    seed is a train seed, so no clip is a test clip's."""
    wanted = COUNT_ANSWERS[index % len(COUNT_ANSWERS)]
    rng = np.random.default_rng([*video_seed("video-count", "train", index), 17])
    while True:
        clip = story(rng)
        found = [q for q in questions(clip) if kind(q[0]) == "video-count" and q[1] == wanted]
        if found:
            question, answer, frames = found[int(rng.integers(len(found)))]
            return VideoExample("video-count", clip.frames, question, answer, frames, clip)


def item(g: int, start: int = 0, weights: dict[str, float] | None = None, balanced_count: bool = False) -> VideoExample:
    """Item ``g`` of a run whose items start at train item ``start`` of every task (``weights``: task ->
    weight, unlisted tasks 1; ``balanced_count``: count items from :func:`balanced_count_item`; see the
    module docstring)."""
    if not weights:
        task, index = VIDEO_QA_TASKS[g % len(VIDEO_QA_TASKS)], start + g // len(VIDEO_QA_TASKS)
    else:
        p = np.array([weights.get(t, 1.0) for t in VIDEO_QA_TASKS])
        task, index = VIDEO_QA_TASKS[int(np.random.default_rng([g, 13]).choice(len(p), p=p / p.sum()))], start + g
    if balanced_count and task == "video-count":
        return balanced_count_item(index)
    return generate_video(task, "train", 1, index)[0]


def turns(example: VideoExample, g: int, extra_turns: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(question, answer, evidence frames): the item's, then ``extra_turns`` (at most) other questions
    about its clip in an order seeded by ``g``."""
    others = [qa for qa in questions(example.clip) if qa[0] != example.question]
    order = np.random.default_rng([g, 11]).permutation(len(others))[:extra_turns]
    return [(example.question, example.answer, example.evidence_frames)] + [others[k] for k in order]


def sequence_text(qas: list[tuple[str, str, tuple[int, ...]]]) -> str:
    """``<s> USER: <video> q ASSISTANT: a </s>`` then `` USER: q ASSISTANT: a </s>`` per further turn."""
    first, *rest = qas
    text = f"{prompt_text(first[0])} {first[1]} </s>"
    return text + "".join(f" USER: {q} ASSISTANT: {a} </s>" for q, a, _ in rest)


def object_tokens(clip: Clip, item: int, frames: range | tuple[int, ...], side: int) -> torch.Tensor:
    """``(F * side * side,)`` bool: the tokens (a ``side x side`` grid per frame) covering object ``item``
    in ``frames``, where it is visible."""
    cell = IMAGE_SIZE // side
    mask = torch.zeros(len(clip.frames), side, side, dtype=torch.bool)
    for f in frames:
        st = clip.tracks[item][f]
        if st.visible:
            mask[f, st.y // cell:(st.y + OBJECT_SIZE - 1) // cell + 1, st.x // cell:(st.x + OBJECT_SIZE - 1) // cell + 1] = True
    return mask.flatten()


def _named(clip: Clip, question: str) -> list[int]:
    """The objects ``question`` names (by their frame-0 colour and shape)."""
    return [o for o, track in enumerate(clip.tracks) if f"the {track[0].colour} {track[0].shape} " in question]


def evidence_tokens(clip: Clip, question: str, frames: tuple[int, ...], side: int) -> torch.Tensor:
    """``(F * side * side,)`` bool: the tokens that cover an object the question names in ``frames``,
    where it is visible."""
    mask = torch.zeros(len(clip.frames) * side * side, dtype=torch.bool)
    for o in _named(clip, question):
        mask |= object_tokens(clip, o, frames, side)
    return mask


COUNT_SHARE = 0.25
"""The count head's target mass per appearance (:func:`count_target`): at most three, so at least a
quarter stays on the first token."""


def count_target(clip: Clip, question: str, frames: tuple[int, ...], side: int) -> torch.Tensor:
    """For a count question, the training-only count head's target over the row's ``F * side * side``
    video tokens ``(V,)`` float: :data:`COUNT_SHARE` per appearance frame (``frames``), spread evenly over
    the asked object's tokens in that frame, so the mass on them grows with the count and the rest
    (``1 - COUNT_SHARE * count``) belongs to the row's first token."""
    target = torch.zeros(len(clip.frames) * side * side)
    for f in frames:
        tokens = evidence_tokens(clip, question, (f,), side)
        target[tokens] += COUNT_SHARE / tokens.sum()
    return target

def before_after(clip: Clip, question: str, side: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a direction or colour question, the asked object's tokens before its move (the frames before
    the move's first) and after it (from the move's last frame on), or before and from its last colour
    change: two ``(F * side * side,)`` bool masks; None for the other questions."""
    task = kind(question)
    if task not in ("video-direction", "video-colour"):
        return None
    item = _named(clip, question)[0]
    wanted = "move" if task == "video-direction" else "colour"
    event = [e for e in clip.events if e.item == item and e.kind == wanted][-1]
    after = event.last if wanted == "move" else event.frame
    return (object_tokens(clip, item, range(event.frame), side),
            object_tokens(clip, item, range(after, len(clip.frames)), side))


def copy_source(s: list[int], answer: int, question: int) -> int:
    """The position in token list ``s`` of the question's shape token that a two-word (colour, shape)
    answer starting at ``answer`` repeats: the one after the answer's colour word in the question
    starting at ``question`` (its ``USER``), i.e. the position ``k`` with ``s[k - 1 : k + 1]`` equal to
    ``s[answer : answer + 2]``.

    Raises:
        ValueError: the question does not hold the answer's two words.
    """
    for k in range(question + 1, answer):
        if s[k - 1] == s[answer] and s[k] == s[answer + 1]:
            return k
    raise ValueError("the question does not name the answered object")


def batch(tokenizer, tokens_per_frame: int, first: int, size: int, extra_turns: int, start: int = 0,
          weights: dict[str, float] | None = None, balanced_count: bool = False) -> dict[str, torch.Tensor]:
    """A left-padded batch of run items ``first .. first + size - 1``: input_ids / attention_mask /
    position_ids / labels ``(B, L)`` (labels IGNORE_INDEX but on answers and their ``</s>``),
    pixel_values_videos ``(B, F, 3, 96, 96)`` and, to pop before the model call, ``task`` ``(B,)`` (each
    row's index in ``VIDEO_QA_TASKS``) and, for the training-only pointer, ``evidence``: ``(rows, query
    positions, masks)``, per answer turn with evidence its batch row, the position that predicts the
    answer and ``(Q, V)`` bool over the row's ``V`` video tokens; for the training-only time heads,
    ``spans``: ``(rows, query positions, before, after)``, the same per direction or colour turn with
    :func:`before_after`'s masks ``(S, V)`` each; for the training-only copy head, ``copies``:
    ``(rows, query positions, sources)`` ``(C,)`` each, per order turn its batch row, the position of the
    answer's colour word (which predicts the shape word) and :func:`copy_source`'s position; for the
    training-only count head, ``counts``: ``(rows, query positions, targets)``, per count turn its batch
    row, the position that predicts the answer and :func:`count_target` ``(N, V)``."""
    examples = [item(first + r, start, weights, balanced_count) for r in range(size)]
    qas = [turns(e, first + r, extra_turns) for r, e in enumerate(examples)]
    texts = [sequence_text(q) for q in qas]
    video = tokenizer.convert_tokens_to_ids("<video>")
    user, assistant, colon, eos = tokenizer.convert_tokens_to_ids(["USER", "ASSISTANT", ":", "</s>"])
    seqs = []
    for text, e in zip(texts, examples):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        k = ids.index(video)
        seqs.append(ids[:k] + [video] * (len(e.frames) * tokens_per_frame) + ids[k + 1:])
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    side = math.isqrt(tokens_per_frame)
    ev_rows, ev_pos, ev_masks = [], [], []
    span_rows, span_pos, befores, afters = [], [], [], []
    copy_rows, copy_pos, copy_src = [], [], []
    count_rows, count_pos, count_targets = [], [], []
    for row, s in enumerate(seqs):
        pad = length - len(s)
        input_ids[row, pad:] = torch.tensor(s)
        mask[row, pad:] = 1
        answer, turn, asked = False, 0, 0
        for j in range(2, len(s)):
            if s[j] == user:
                asked = j
            if s[j - 2] == assistant and s[j - 1] == colon:
                answer = True
                question, _, frames = qas[row][turn]
                target = evidence_tokens(examples[row].clip, question, frames, side)
                if target.any():
                    ev_rows.append(row)
                    ev_pos.append(pad + j - 1)
                    ev_masks.append(target)
                spans = before_after(examples[row].clip, question, side)
                if spans is not None:
                    span_rows.append(row)
                    span_pos.append(pad + j - 1)
                    befores.append(spans[0])
                    afters.append(spans[1])
                if kind(question) == "video-order":
                    copy_rows.append(row)
                    copy_pos.append(pad + j)
                    copy_src.append(pad + copy_source(s, j, asked))
                if kind(question) == "video-count":
                    count_rows.append(row)
                    count_pos.append(pad + j - 1)
                    count_targets.append(count_target(examples[row].clip, question, frames, side))
                turn += 1
            if answer:
                labels[row, pad + j] = s[j]
                answer = s[j] != eos
    pixels = torch.from_numpy(np.stack([e.frames for e in examples])).permute(0, 1, 4, 2, 3)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "pixel_values_videos": normalize(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2]), "labels": labels,
            "task": torch.tensor([VIDEO_QA_TASKS.index(e.task) for e in examples]),
            "evidence": (torch.tensor(ev_rows, dtype=torch.long), torch.tensor(ev_pos, dtype=torch.long),
                         torch.stack(ev_masks) if ev_masks else torch.zeros(0, 0, dtype=torch.bool)),
            "spans": (torch.tensor(span_rows, dtype=torch.long), torch.tensor(span_pos, dtype=torch.long),
                      torch.stack(befores) if befores else torch.zeros(0, 0, dtype=torch.bool),
                      torch.stack(afters) if afters else torch.zeros(0, 0, dtype=torch.bool)),
            "copies": (torch.tensor(copy_rows, dtype=torch.long), torch.tensor(copy_pos, dtype=torch.long),
                       torch.tensor(copy_src, dtype=torch.long)),
            "counts": (torch.tensor(count_rows, dtype=torch.long), torch.tensor(count_pos, dtype=torch.long),
                       torch.stack(count_targets) if count_targets else torch.zeros(0, 0))}
