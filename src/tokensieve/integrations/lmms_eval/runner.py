"""Answering lmms-eval's generation requests with a tokensieve-pruned model, and the per-sample report.

Nothing here imports lmms-eval: :class:`Request` is a request already unpacked from lmms-eval's
tuple, and :class:`Runner` turns a batch of them into answer texts, one ``prune()`` context per batch.

Two prompt constructions (:data:`~.model_args.PROMPTS`):

* ``tokensieve`` (the exported ``tokensieve_*`` tasks): the request's text is the question and its one
  image the picture, fed through :meth:`tokensieve.evaluation.Prompting.inputs` and read back with
  :meth:`~tokensieve.evaluation.Prompting.answers`, so each answer is exactly the one
  ``tokensieve eval`` gives for the item (with the same batches, the same numbers).
* ``task`` (every other task): the request's own messages (chat) or its images then its text
  (simple), through the processor's chat template; the answer is the decoded continuation, cut at
  the first of the task's ``until`` strings. A processor without a chat template (the shipped tiny
  model and its retrained checkpoints) gets the tiny prompt format, one image per request; a text
  model (``tiny-text``, Llama, Qwen2) gets its tokenizer's chat template, or the bare text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ... import __version__, evaluation, models, protocols
from ...engine import prune
from ...report import Report, SampleReport
from ...tasks import Example
from .export import TASK_PREFIX
from .model_args import Settings

TASK_MAX_NEW_TOKENS = 128
"""Tokens generated for a task whose ``generation_kwargs`` set no ``max_new_tokens``."""

SAMPLE_FIELDS: tuple[str, ...] = ("visual_tokens", "visual_lengths", "visual_kept", "hidden_lengths",
                                  "cache_lengths_prefill", "kv_bytes_prefill", "kv_bytes_end",
                                  "kv_bytes_stored_prefill", "note")
"""The :class:`~tokensieve.report.SampleReport` fields each report row copies (besides the FLOPs); the
per-layer position lists of the cache and of each head are left out, which on a 7B model would be
tens of thousands of numbers per request."""


@dataclass
class Request:
    """One ``generate_until`` request, unpacked from lmms-eval's tuple.

    Attributes:
        task, doc_id: where it comes from (the report's keys).
        text: the prompt text lmms-eval built (``doc_to_text`` with the task's pre and post prompts).
        images: its images, in order.
        generation: the task's ``generation_kwargs`` (with lmms-eval's ``until``).
        messages: for a chat request, the task's messages with each image replaced by a placeholder
            ``{"type": "image"}`` (``images`` holds them, in the same order); None for a simple request.
    """

    task: str
    doc_id: int
    text: str
    images: list[Image.Image]
    generation: dict[str, Any]
    messages: list[dict[str, Any]] | None = None


class Runner:
    """A loaded model, its prompting and the method, answering batches of requests.

    Args:
        settings: from :func:`~.model_args.parse`; the model loads here.

    Raises:
        ValueError: the model cannot load (:func:`tokensieve.models.load`), or ``protocol`` is
            ``question-after`` for a text model (lmms-eval's text gives no question boundary).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model, processor = models.load(settings.pretrained, settings.device, settings.dtype)
        self.prompting = evaluation.Prompting.for_processor(processor)
        if self.prompting.text and settings.protocol == "question-after":
            raise ValueError("protocol=question-after needs the question's place in the prompt, which lmms-eval's "
                             "requests do not give for a text model; use protocol=whole")
        self.protocol = "whole" if self.prompting.text else protocols.resolve(settings.protocol, False)
        self.options = dict(settings.options)
        if settings.calibrate is not None:
            self.options["recipe"] = evaluation.calibrate_on_tasks(self.model, self.prompting, "all", settings.calibrate,
                                                                   model_name=settings.pretrained)
        self.rows: list[dict[str, Any]] = []
        self.last: Report | None = None

    def mode(self, task: str) -> str:
        """The prompt construction for ``task``'s requests: ``tokensieve`` or ``task``."""
        if self.settings.prompt != "auto":
            return self.settings.prompt
        return "tokensieve" if task.startswith(TASK_PREFIX) else "task"

    @torch.no_grad()
    def generate(self, batch: list[Request]) -> list[str]:
        """The answers to ``batch`` (requests of one task with the same generation arguments), generated
        inside one ``prune()`` context; each request's report row is kept for :meth:`report`."""
        mode = self.mode(batch[0].task)
        inputs = evaluation.model_inputs(self._inputs(batch, mode), self.model)
        question = None
        if self.protocol == "question-after":
            question = protocols.question_lengths(self.prompting, batch, inputs, self.model)
        generation = self._generation(batch[0].generation, mode)
        with prune(self.model, self.settings.method, **self.options) as run:
            out, prompt_len, _ = protocols.generate(self.model, inputs, generation, self.protocol, question,
                                                    self.prompting.tokenizer.pad_token_id)
        if mode == "tokensieve":
            answers = self.prompting.answers(out, prompt_len)
        else:
            answers = self._decode(out, prompt_len, batch[0].generation.get("until"))
        self.last = run.report
        self.rows += [_row(r, a, s) for r, a, s in zip(batch, answers, run.report.samples)]
        return answers

    def _inputs(self, batch: list[Request], mode: str) -> Any:
        """Model inputs for ``batch`` under the prompt construction ``mode``."""
        prompting = self.prompting
        if prompting.text:
            if mode == "tokensieve":
                raise ValueError(f"the {TASK_PREFIX}* tasks are image tasks; {self.settings.pretrained} is a text model")
            for r in batch:
                if r.images:
                    raise ValueError(f"{r.task} doc {r.doc_id} has {len(r.images)} image(s); "
                                     f"{self.settings.pretrained} is a text model")
            return self._text_inputs(batch)
        if mode == "tokensieve" or prompting.tiny:
            for r in batch:
                if len(r.images) != 1:
                    why = "the tokensieve prompt" if mode == "tokensieve" else "a model without a chat template"
                    raise ValueError(f"{why} takes one image per request; {r.task} doc {r.doc_id} has {len(r.images)}")
            return prompting.inputs([Example(task=r.task, image=r.images[0], question=r.text, answer="") for r in batch])
        processor = prompting.processor
        texts = [processor.apply_chat_template(_conversation(r), add_generation_prompt=True) for r in batch]
        images = [image for r in batch for image in r.images]
        return processor(images=images or None, text=texts, padding=True, return_tensors="pt")

    def _text_inputs(self, batch: list[Request]) -> Any:
        """A text model's inputs: its tokenizer's chat template over the conversation, or the bare text."""
        tokenizer = self.prompting.processor
        if getattr(tokenizer, "chat_template", None):
            texts = [tokenizer.apply_chat_template(_conversation(r, text_only=True), add_generation_prompt=True,
                                                   tokenize=False) for r in batch]
            return tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return tokenizer([r.text for r in batch], padding=True, return_tensors="pt")

    def _generation(self, gen_kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
        """``generate()`` arguments from the task's: its token limit (by default the prompting's under the
        tokensieve prompt, :data:`TASK_MAX_NEW_TOKENS` otherwise); greedy unless it samples.

        Raises:
            ValueError: beam search (``num_beams`` above 1), which the engine does not run.
        """
        if (gen_kwargs.get("num_beams") or 1) > 1:
            raise ValueError(f"num_beams={gen_kwargs['num_beams']}: tokensieve generates greedily or by sampling, "
                             "not by beam search")
        default = self.prompting.max_new_tokens if mode == "tokensieve" else TASK_MAX_NEW_TOKENS
        generation: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default),
                                      "do_sample": bool(gen_kwargs.get("do_sample", False))}
        if generation["do_sample"]:
            generation.update({k: gen_kwargs[k] for k in ("temperature", "top_p", "top_k") if gen_kwargs.get(k) is not None})
        return generation

    def _decode(self, out: torch.Tensor, prompt_len: int, until: str | list[str] | None) -> list[str]:
        """The generated texts, each cut at the first of the ``until`` strings."""
        stops = [until] if isinstance(until, str) else list(until or [])
        texts = []
        for text in self.prompting.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True):
            for stop in stops:
                if stop:
                    text = text.split(stop, 1)[0]
            texts.append(text.strip())
        return texts

    def report(self) -> dict[str, Any]:
        """The JSON-ready report of every request answered so far: the settings (the method's options as
        in effect), the totals overall and per task, and one row per request."""
        if self.last is None:
            raise ValueError("no request has been answered yet")
        tasks = list(dict.fromkeys(row["task"] for row in self.rows))
        return {"tokensieve": __version__, "model": self.settings.pretrained, "method": self.last.method,
                "options": self.last.options, "positions": self.last.positions, "prompt": self.settings.prompt,
                "protocol": self.protocol, "batch_size": self.settings.batch_size,
                **evaluation.model_runtime(self.model),
                "summary": summary(self.rows), "per_task": {t: summary([r for r in self.rows if r["task"] == t]) for t in tasks},
                "samples": self.rows}

    def write_report(self, path: Path) -> None:
        """Write :meth:`report` to ``path`` as JSON, creating its folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=1) + "\n")


def _conversation(request: Request, text_only: bool = False) -> list[dict[str, Any]]:
    """The chat-template conversation of ``request``: its own messages, or one user turn holding its
    images then its text; ``text_only``: each turn's text parts joined, for a tokenizer's template."""
    messages = request.messages
    if messages is None:
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}]
        messages = [{"role": "user", "content": content}]
    if text_only:
        return [{"role": m["role"], "content": "\n".join(p["text"] for p in m["content"] if p["type"] == "text")}
                for m in messages]
    return messages


def _row(request: Request, answer: str, sample: SampleReport) -> dict[str, Any]:
    """One request's report row (the sample's fields read directly: copying the whole report, per-head
    cache positions included, for a few of them would cost more than the row)."""
    return {"task": request.task, "doc_id": request.doc_id, "answer": answer, "flops": sample.flops,
            "flops_unpruned": sample.flops_unpruned, "flops_ratio": sample.flops / max(1, sample.flops_unpruned),
            **{k: getattr(sample, k) for k in SAMPLE_FIELDS}}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of report rows: their count, the FLOPs ratio (summed pruned over summed unpruned FLOPs),
    the mean visual tokens in the input and entering each layer (mean over layers), the mean KV bytes
    after prefill."""
    n = len(rows)
    kept = [sum(r["visual_lengths"]) / max(1, len(r["visual_lengths"])) for r in rows]
    return {"samples": n, "flops_ratio": sum(r["flops"] for r in rows) / max(1, sum(r["flops_unpruned"] for r in rows)),
            "visual_tokens": sum(r["visual_tokens"] for r in rows) / max(1, n),
            "visual_tokens_kept": sum(kept) / max(1, n),
            "kv_bytes_prefill": sum(r["kv_bytes_prefill"] for r in rows) / max(1, n)}
