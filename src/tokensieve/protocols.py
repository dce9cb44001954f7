"""How a prompt reaches the model during evaluation: whole, or its context first and the question after.

* ``"whole"``: the prompt (context and question) is one prefill, then the answer is decoded. A cache
  method that evicts once the prefill is done cannot change a one-word answer this way: the first
  answer token is computed from the full prefill.
* ``"question-after"``: the context (a text task's text before its question; a VLM prompt up to and
  including its last image token) is prefilled first, then the question and the answer cue are fed as
  one more pass, and the answer is decoded. A method that compresses the cache after the prefill then
  compresses the context without seeing the question, as in kvpress's pipeline
  (``KVPressTextGenerationPipeline``: context compressed, questions after) and the query-agnostic
  settings of the KV-cache papers. Time to first token is then the two passes together.

* ``"auto"``: ``"question-after"`` for a text model on the text tasks (the KV-cache papers' long-context
  setting, and kvpress's), ``"whole"`` for a VLM on the image tasks (how the visual-token papers
  evaluate).

Both run through ``generate()`` (the first with ``max_new_tokens=1``, so one forward), which supplies
position ids, image inputs and the cache; the two calls share one ``DynamicCache``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import DynamicCache

from .compat import cache_argument

Protocol = Literal["auto", "whole", "question-after"]
PROTOCOLS: tuple[str, ...] = ("auto", "whole", "question-after")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def resolve(protocol: str, text: bool) -> str:
    """The protocol ``protocol`` stands for on a text model (``text``) or a VLM: ``"auto"`` resolved."""
    check_protocol(protocol)
    if protocol != "auto":
        return protocol
    return "question-after" if text else "whole"


def question_lengths(prompting: Any, examples: list, inputs: dict[str, torch.Tensor], model: Any) -> list[int]:
    """Per row, the number of tokens at the end of its prompt that the question part holds.

    A text task: the tokens of its prompt from the question on (the question and the answer cue). A
    VLM prompt: the tokens after its last image (or video) token."""
    if prompting.text:
        tokenizer = prompting.processor
        return [len(tokenizer(e.prompt[e.prompt.rindex(e.question):], add_special_tokens=False).input_ids)
                for e in examples]
    config = model.config
    image = getattr(config, "image_token_id", None)
    image = getattr(config, "image_token_index", None) if image is None else image
    if image is None:
        raise ValueError("protocol 'question-after' needs the model's image token id (config.image_token_id)")
    visual = [image] + [v for v in (getattr(config, "video_token_id", None),) if v is not None]
    ids = inputs["input_ids"]
    lengths = []
    for row in ids:
        where = torch.isin(row, torch.tensor(visual, device=row.device)).nonzero()
        if len(where) == 0:
            raise ValueError("protocol 'question-after' needs an image in every prompt of a VLM")
        lengths.append(ids.shape[1] - 1 - int(where[-1]))
    return lengths


def split_inputs(inputs: dict[str, torch.Tensor], question: list[int], pad_id: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The context inputs and the whole prompt, re-padded so the question starts at one column.

    ``inputs``: left-padded ``input_ids`` and ``attention_mask`` ``(B, L)`` and any image inputs;
    ``question``: per row, the tokens of its question part (at the end of the row). Returns the context
    (``(B, C)`` left-padded ids and mask, and the image inputs) and the whole prompt ``(B, C + Q)``: each
    row's context left-padded to ``C``, then its question left-padded to ``Q`` (padding between them
    where questions differ in length, masked out)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, length = ids.shape
    real = mask.sum(1).tolist()
    ctx_len = [n - q for n, q in zip(real, question)]
    if min(ctx_len) < 1:
        raise ValueError("a prompt has no context before its question")
    width_c, width_q = max(ctx_len), max(question)
    context = torch.full((batch, width_c), pad_id, dtype=ids.dtype, device=ids.device)
    quest = torch.full((batch, width_q), pad_id, dtype=ids.dtype, device=ids.device)
    c_mask = torch.zeros(batch, width_c, dtype=inputs["attention_mask"].dtype, device=ids.device)
    q_mask = torch.zeros(batch, width_q, dtype=c_mask.dtype, device=ids.device)
    for b in range(batch):
        row = ids[b, length - real[b]:]
        context[b, width_c - ctx_len[b]:] = row[: ctx_len[b]]
        c_mask[b, width_c - ctx_len[b]:] = 1
        quest[b, width_q - question[b]:] = row[ctx_len[b]:]
        q_mask[b, width_q - question[b]:] = 1
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    first = {"input_ids": context, "attention_mask": c_mask, **extra}
    whole = {"input_ids": torch.cat([context, quest], 1), "attention_mask": torch.cat([c_mask, q_mask], 1)}
    return first, whole


def generate(model: Any, inputs: dict[str, torch.Tensor], generation: dict[str, Any], protocol: Protocol = "whole",
             question: list[int] | None = None, pad_id: int = 0) -> tuple[torch.Tensor, int, int]:
    """Greedy generation under ``protocol``; returns ``(ids, prompt_len, prefill_calls)``: the generated
    ids ``(B, prompt_len + T)``, the prompt's width, and how many forwards make the time to first token.

    ``question`` (per row, its question tokens) is needed for ``"question-after"``."""
    if protocol == "whole":
        return model.generate(**inputs, **generation), inputs["input_ids"].shape[1], 1
    if question is None:
        raise ValueError("protocol 'question-after' needs the question lengths")
    first, whole = split_inputs(inputs, question, pad_id)
    cache = cache_argument(model, DynamicCache())
    model.generate(**first, **cache, **{**generation, "max_new_tokens": 1})
    out = model.generate(**whole, **cache, **generation)
    return out, whole["input_ids"].shape[1], 2
