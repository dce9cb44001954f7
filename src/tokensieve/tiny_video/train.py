"""``tokensieve train-tiny-video``: train the tiny video VLM (:mod:`.build`: the shipped tiny LLaVA as a
``LlavaNextVideoForConditionalGeneration``) on the video question tasks, on a CPU.

The vision tower stays as the image model trained it (frozen; its patch features already tell the
suite's colours and shapes apart); the projector and decoder train. Training-only aid (discarded;
the checkpoint is the stock class): the image model's evidence pointer
(:class:`tokensieve.tiny.auxiliary.EvidencePointer`, a bilinear scorer on the hidden states entering
decoder layer ``pointer_layer``) must point from each answer-predicting token at the video tokens of
the asked objects in the question's evidence frames (:func:`.data.evidence_tokens`), weighted
``pointer`` against the answer loss, as the image model was helped to look (docs/tiny_model.md holds
what was measured with and without it). A second aid shapes the shipped model's own attention: on
direction and colour answers, head 0 of decoder layer ``time_layer`` must put its mass on the asked
object's tokens before its move or colour change and head 1 on them after it (:func:`time_heads_loss`,
:func:`.data.before_after`), weighted ``time_weight``; the token values carry no frame index, so a
question about what changed needs heads that tell early frames from late ones. On the same answers
the first answer token must also be read off the output of decoder layer ``time_layer + 1`` through
the model's own final norm and LM head (:func:`early_answer_loss`, same weight): the comparison of the
two heads' outputs is learnt right after them. A third aid helps the answer's second word: on
order answers (colour then shape), head ``copy_head`` of decoder layer ``copy_layer`` must attend from
the answer's colour word to the question's shape token of the answered object (:func:`copy_loss`,
:func:`.data.copy_source`), weighted ``copy_weight``, the copy an induction head makes; without it the
shape word was often neither object of the question (docs/tiny_model.md); and, as for the time
heads, the shape word must also be read off that layer's own output through the final norm and LM
head (:func:`early_answer_loss`, weighted ``copy_early_weight``). A fourth, off by default, is for
count: head ``count_head`` of decoder layer ``count_layer`` must put a quarter of its mass on the asked
object's tokens in each frame where it appears and the rest on the row's first token
(:func:`count_loss`, :func:`.data.count_target`), so that the head's output is a mix that moves with
the count, and the answer must be read off that layer's output (:func:`early_answer_loss`), both
weighted ``count_weight``; ``balanced_count`` draws count items with answers 1, 2 and 3 equally often
(:func:`.data.balanced_count_item`). Schedule (step-based, so a run is
reproducible from its flags): AdamW (weight decay 0.05, none on biases, norms and embeddings), linear
warm-up then cosine decay (:func:`tokensieve.learned.loop.learning_rate`); step ``s`` trains on run
items ``s * batch .. + batch - 1`` (:mod:`.data`: the five tasks in turn, every item new). The history
records, per ``save_every`` steps, the loss and each task's accuracy on the first answer (every
token of it, teacher-forced) of those fresh items (a held-out measure: no item repeats). A partial
checkpoint (weights, AdamW moments, step, history, RNG) is written every ``save_every`` steps;
``--resume`` continues from it to the same weights. The output folder gets the stock checkpoint (``save_pretrained``), the processor's files and
``training_summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cli import training_flags
from ..learned.fit import adamw, fit
from ..tasks.video_questions import VIDEO_QA_TASKS
from ..tiny import TINY_DIR, load_tiny
from ..tiny.auxiliary import EvidencePointer, attention_at, evidence_nll, visual_attention
from . import data
from .build import build_model, tokens_per_frame
from .processor import FrameVideoProcessor

ITEMS_PER_SEED = 10**7


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tiny-video", help="train the tiny video VLM (LLaVA-NeXT-Video) on the video question tasks on the CPU")
    training_flags.add_schedule(p, "the checkpoint, processor and training_summary.json", steps=2200, batch_size=8, lr=8e-4, warmup=100)
    p.add_argument("--pointer", type=float, default=1.0,
                   help="weight of the training-only evidence pointer's loss (0: none; the pointer is discarded)")
    p.add_argument("--pointer-layer", type=int, default=4, help="decoder layer whose input the pointer reads")
    p.add_argument("--time-weight", type=float, default=1.0,
                   help="weight of the training-only time-head loss (0: none): on direction and colour answers, "
                        "head 0 of --time-layer must attend to the object before its change, head 1 after it")
    p.add_argument("--time-layer", type=int, default=3, help="decoder layer whose heads 0 and 1 are the time heads (the answer is also read off the next layer's output)")
    p.add_argument("--copy-weight", type=float, default=1.0,
                   help="weight of the training-only copy-head loss (0: none): on order answers, --copy-head of "
                        "--copy-layer must attend from the answer's colour word to the question's shape word of that object")
    p.add_argument("--copy-early-weight", type=float, default=1.0,
                   help="weight of the training-only early shape word (0: none): on order answers, the shape word "
                        "must also be read off --copy-layer's own output through the final norm and LM head")
    p.add_argument("--copy-layer", type=int, default=6, help="decoder layer of the copy head")
    p.add_argument("--copy-head", type=int, default=2, help="attention head of --copy-layer that is the copy head")
    p.add_argument("--count-weight", type=float, default=0.0,
                   help="weight of the training-only count-head loss (0: none): on count answers, --count-head of "
                        "--count-layer must put a quarter of its mass on the asked object in each frame it appears, the "
                        "rest on the first token, and the answer must be read off that layer's output")
    p.add_argument("--count-layer", type=int, default=5, help="decoder layer of the count head")
    p.add_argument("--count-head", type=int, default=0, help="attention head of --count-layer that is the count head")
    p.add_argument("--task-weights", type=training_flags.task_weights_type(VIDEO_QA_TASKS), default={},
                   help="comma-separated task=weight: each item's task drawn in proportion (unlisted tasks weigh 1), "
                        "e.g. video-direction=3; default: the five tasks in turn")
    p.add_argument("--balanced-count", action="store_true",
                   help="fix each count item's answer before its clip, 1, 2, 3 in turn by item index (the split's own prior is "
                        "about 62%% '1', 34%% '2', 4%% '3')")
    p.add_argument("--extra-turns", type=int, default=10, help="further questions about the same clip per sequence")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a tiny video checkpoint to train on from (default: convert the shipped tiny LLaVA)")
    training_flags.add(p, save_every=50, eval_items=0, eval_what="(unused: the history measures fresh items)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = training_flags.check(args, ("extra_turns",))
    if args.batch_size < len(VIDEO_QA_TASKS):
        raise ValueError(f"--batch-size must be at least {len(VIDEO_QA_TASKS)} (one item of every task per step)")
    weights = {"--pointer": args.pointer, "--time-weight": args.time_weight, "--copy-weight": args.copy_weight,
               "--copy-early-weight": args.copy_early_weight, "--count-weight": args.count_weight}
    negative = [f"{name} {value}" for name, value in weights.items() if value < 0]
    if negative:
        raise ValueError(f"{', '.join(weights)} must be >= 0, got {', '.join(negative)}")
    summary = train(args.out, args.steps, args.batch_size, args.lr, args.warmup, args.seed, args.save_every,
                    args.resume, args.extra_turns, args.init_from, args.pointer, args.pointer_layer, args.task_weights,
                    args.time_weight, args.time_layer, args.copy_weight, args.copy_layer, args.copy_head,
                    args.copy_early_weight, args.balanced_count, args.count_weight, args.count_layer, args.count_head,
                    command=command)
    last = summary["history"][-1]
    print(f"trained in {summary['train_seconds']} s; last {args.save_every} steps: "
          + " ".join(f"{t}={last[t]:.3f}" for t in VIDEO_QA_TASKS if t in last) + f"; written to {args.out}")
    return 0


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "norm" in name or "embed" in name


def pointer_loss(pointer: EvidencePointer, hidden: torch.Tensor, video: torch.Tensor,
                 evidence: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``-log`` of the pointer's softmax mass on each answer's evidence tokens, averaged: ``hidden``
    ``(B, L, D)``, ``video`` ``(B, L)`` bool (the same count per row), ``evidence`` as
    :func:`.data.batch` gives it."""
    rows, positions, masks = evidence
    batch, _, width = hidden.shape
    keys = pointer.key(hidden[video].view(batch, -1, width))  # (B, V, d)
    queries = pointer.query(hidden[rows, positions])  # (Q, d)
    scores = torch.einsum("qd,qvd->qv", queries, keys[rows]) * pointer.scale
    return evidence_nll(scores.log_softmax(-1), masks)


def time_heads_loss(model, hidden_states: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor], layer: int,
                    spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean ``-log`` attention mass of head 0 of decoder layer ``layer`` on each span's ``before``
    tokens and of head 1 on its ``after`` tokens (``spans`` as
    :func:`.data.batch` gives them; ``hidden_states[layer]`` ``(B, L, D)`` is the layer's input). Head 0
    and head 1 share one key/value head; rotary positions tell them early from late frames."""
    rows, positions, before, after = spans
    decoder = model.model.language_model
    cos, sin = decoder.rotary_emb(hidden_states[0], batch["position_ids"])
    video = batch["input_ids"] == model.config.video_token_id
    attention = visual_attention(decoder.layers[layer], hidden_states[layer], cos, sin, batch["attention_mask"], video,
                                 rows, positions)  # (S, H, V), one recomputation for both heads
    return (evidence_nll(attention[:, 0].log(), before) + evidence_nll(attention[:, 1].log(), after)) / 2


def copy_loss(model, hidden_states: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor], layer: int, head: int,
              copies: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean ``-log`` attention of head ``head`` of decoder layer ``layer`` from each copy's query position
    onto its source position (``copies`` ``(rows, positions, sources)`` as :func:`.data.batch` gives them;
    ``hidden_states[layer]`` ``(B, L, D)`` is the layer's input)."""
    rows, positions, sources = copies
    decoder = model.model.language_model
    cos, sin = decoder.rotary_emb(hidden_states[0], batch["position_ids"])
    attention = attention_at(decoder.layers[layer], hidden_states[layer], cos, sin, batch["attention_mask"], rows,
                             positions)[:, head]  # (C, L)
    return -attention[torch.arange(len(rows)), sources].log().mean()


def count_loss(model, hidden_states: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor], layer: int, head: int,
               counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the attention of head ``head`` of decoder layer ``layer`` at each count
    query against its target (``counts`` ``(rows, positions, targets)`` as :func:`.data.batch` gives
    them: ``targets`` ``(N, V)`` over the row's video tokens, the rest of each unit mass on the row's
    first token), i.e. the KL divergence from target to attention up to the target's entropy: the
    head's mass on the asked object's appearance frames is a quarter per appearance, so its output
    moves with the count (``hidden_states[layer]`` ``(B, L, D)`` is the layer's input)."""
    rows, positions, targets = counts
    decoder = model.model.language_model
    cos, sin = decoder.rotary_emb(hidden_states[0], batch["position_ids"])
    attention = attention_at(decoder.layers[layer], hidden_states[layer], cos, sin, batch["attention_mask"], rows,
                             positions)[:, head]  # (N, L)
    video = (batch["input_ids"] == model.config.video_token_id)[rows]
    log_video = attention[video].view(len(rows), -1).clamp_min(1e-12).log()  # (N, V)
    first = batch["attention_mask"].argmax(-1)[rows]  # left padding: each row's first token
    log_first = attention[torch.arange(len(rows)), first].clamp_min(1e-12).log()
    return -((targets * log_video).sum(-1) + (1 - targets.sum(-1)) * log_first).mean()

def early_answer_loss(model, hidden: torch.Tensor, labels: torch.Tensor, queries: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of the token after each query position, read off ``hidden`` ``(B, L, D)`` (an early
    layer's output) at that position through the model's own final norm and LM head: the answer must
    already be there. ``queries`` starts with ``(rows, positions)`` ``(Q,)`` each (``spans`` or ``copies``
    of :func:`.data.batch`)."""
    rows, positions = queries[0], queries[1]
    logits = model.lm_head(model.model.language_model.norm(hidden[rows, positions]))
    return torch.nn.functional.cross_entropy(logits.float(), labels[rows, positions + 1])


def first_answer_right(logits: torch.Tensor, labels: torch.Tensor, eos: int) -> torch.Tensor:
    """``(B,)`` bool: whether every token of each row's first answer (up to its ``</s>``) is the argmax
    of ``logits`` ``(B, L, vocab)`` at the position before it (teacher-forced); ``labels`` ``(B, L)``.
    Whole answers, so a two-word answer's second word counts."""
    targets = labels[:, 1:]
    ends = (targets == eos).int()
    first_turn = (targets != data.IGNORE_INDEX) & (ends.cumsum(-1) - ends == 0)  # up to the first </s>
    return ((logits[:, :-1].argmax(-1) == targets) | ~first_turn).all(-1)


def train(out: Path, steps: int = 2200, batch_size: int = 8, lr: float = 8e-4, warmup: int = 100, seed: int = 0,
          save_every: int = 50, resume: bool = False, extra_turns: int = 10, init_from: Path | None = None,
          pointer_weight: float = 1.0, pointer_layer: int = 4, task_weights: dict[str, float] | None = None,
          time_weight: float = 1.0, time_layer: int = 3, copy_weight: float = 1.0, copy_layer: int = 6, copy_head: int = 2,
          copy_early_weight: float = 1.0, balanced_count: bool = False, count_weight: float = 0.0,
          count_layer: int = 5, count_head: int = 0, command: dict | None = None, progress: bool = True) -> dict:
    """Train and save to ``out``; returns the summary.

    Raises:
        ValueError: ``resume`` without a partial checkpoint in ``out``; a layer or head out of range.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if init_from is not None:
        from . import load_tiny_video

        model, processor = load_tiny_video(torch.float32, init_from)
        tokenizer = processor.tokenizer
    else:
        model, tokenizer = build_model(seed)
        vision = model.config.vision_config
        processor = FrameVideoProcessor(load_tiny(torch.float32, TINY_DIR)[1].image_processor, tokenizer,
                                        tokens_per_frame(vision.image_size, vision.patch_size))
    model.model.vision_tower.requires_grad_(False)
    model.train()
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    if not (0 <= pointer_layer < layers and 0 <= time_layer < layers - 1 and 0 <= copy_layer < layers
            and 0 <= count_layer < layers):
        raise ValueError(f"--pointer-layer, --copy-layer and --count-layer must be in 0..{layers - 1} and --time-layer "
                         f"in 0..{layers - 2}, got {pointer_layer}, {copy_layer}, {count_layer} and {time_layer}")
    if not (0 <= copy_head < heads and 0 <= count_head < heads):
        raise ValueError(f"--copy-head and --count-head must be in 0..{heads - 1}, got {copy_head} and {count_head}")
    pointer = EvidencePointer(model.config.text_config.hidden_size)
    trained = torch.nn.ModuleDict({"model": model, "pointer": pointer})
    optimizer = adamw(trained, lr, _no_decay, betas=(0.9, 0.98))
    start = seed * ITEMS_PER_SEED

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = data.batch(tokenizer, processor.tokens_per_frame, step * batch_size, batch_size, extra_turns, start,
                           task_weights, balanced_count)
        evidence, spans, copies, tasks = batch.pop("evidence"), batch.pop("spans"), batch.pop("copies"), batch.pop("task")
        counts = batch.pop("counts")
        out_ = model(**batch, output_hidden_states=max(pointer_weight, time_weight, copy_weight, copy_early_weight,
                                                       count_weight) > 0)
        loss = out_.loss
        with torch.no_grad():
            hit = first_answer_right(out_.logits, batch["labels"], tokenizer.eos_token_id)
        shown = {"loss": float(out_.loss.detach())}
        if pointer_weight > 0:
            aux = torch.zeros(())
            if len(evidence[0]):
                video = batch["input_ids"] == model.config.video_token_id
                aux = pointer_loss(pointer, out_.hidden_states[pointer_layer], video, evidence)
            loss = loss + pointer_weight * aux
            shown["pointer"] = float(aux.detach())
        if time_weight > 0:
            aux = torch.zeros(())
            early = torch.zeros(())
            if len(spans[0]):
                aux = time_heads_loss(model, out_.hidden_states, batch, time_layer, spans)
                early = early_answer_loss(model, out_.hidden_states[time_layer + 2], batch["labels"], spans)
            loss = loss + time_weight * (aux + early)
            shown["time"] = float(aux.detach())
            shown["early"] = float(early.detach())
        if copy_weight > 0:
            aux = copy_loss(model, out_.hidden_states, batch, copy_layer, copy_head, copies) if len(copies[0]) else torch.zeros(())
            loss = loss + copy_weight * aux
            shown["copy"] = float(aux.detach())
        if copy_early_weight > 0:
            early = torch.zeros(())
            if len(copies[0]):
                early = early_answer_loss(model, out_.hidden_states[copy_layer + 1], batch["labels"], copies)
            loss = loss + copy_early_weight * early
            shown["copy_early"] = float(early.detach())
        if count_weight > 0:
            aux = torch.zeros(())
            early = torch.zeros(())
            if len(counts[0]):
                aux = count_loss(model, out_.hidden_states, batch, count_layer, count_head, counts)
                early = early_answer_loss(model, out_.hidden_states[count_layer + 1], batch["labels"], counts)
            loss = loss + count_weight * (aux + early)
            shown["count"] = float(aux.detach())
            shown["count_early"] = float(early.detach())
        for t, name in enumerate(VIDEO_QA_TASKS):
            chosen = tasks == t
            if chosen.any():
                shown[name] = float(hit[chosen].float().mean())
        return loss, shown

    history, seconds = fit(trained, optimizer, step_loss, out, steps=steps, lr=lr, warmup=warmup,
                           save_every=save_every, resume=resume, clip=1.0, desc="train-tiny-video", progress=progress)
    model.eval()
    summary = {"command": command or {}, "tasks": list(VIDEO_QA_TASKS), "steps": steps, "batch_size": batch_size,
               "lr": lr, "warmup": warmup, "seed": seed, "extra_turns": extra_turns, "pointer": pointer_weight,
               "pointer_layer": pointer_layer, "time_weight": time_weight, "time_layer": time_layer,
               "copy_weight": copy_weight, "copy_early_weight": copy_early_weight, "copy_layer": copy_layer, "copy_head": copy_head, "task_weights": task_weights or {},
               "balanced_count": balanced_count, "count_weight": count_weight, "count_layer": count_layer,
               "count_head": count_head,
               "init_from": str(init_from) if init_from else "the shipped tiny LLaVA", "train_seconds": seconds,
               "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "history": history}
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "partial.safetensors").unlink(missing_ok=True)
    return summary
