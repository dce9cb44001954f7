"""The lmms-eval model classes: ``--model tokensieve`` (chat) and ``--model tokensieve --force_simple``.

lmms-eval builds the class with ``--model_args`` plus ``batch_size`` (text from its command line),
``device`` and ``max_batch_size`` (those two only when given), and then calls ``generate_until`` once
with every request of the run. Requests are 6-tuples:

* simple: ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``;
* chat: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``.

The doc itself is ``self.task_dict[task][split][doc_id]``. Requests are grouped by task and generation
arguments, ordered by ``doc_id`` within a group, and generated ``batch_size`` at a time, so the
exported tasks run in the batches ``tokensieve eval --batch-size N`` uses on the same items.

Under ``accelerate launch`` (``WORLD_SIZE`` above 1) lmms-eval gives each process its share of the
requests; each process then runs on ``cuda:LOCAL_RANK`` (unless ``device`` names another) and writes
its own report, ``<report stem>.rank<R>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from .model_args import parse
from .runner import Request, Runner

SUPPORTED = "generate_until (tasks with output_type: generate_until)"


class TokensieveSimple(lmms):
    """tokensieve in lmms-eval, simple requests: the prompt text and ``doc_to_visual``'s images.

    Args:
        **model_args: :func:`~.model_args.parse`'s arguments (``pretrained``, ``method`` and its
            options, ``device``, ``dtype``, ``protocol``, ``prompt``, ``report``, ``batch_size``).

    Raises:
        ValueError / TypeError: bad model arguments, before the model loads (see :func:`~.model_args.parse`).
    """

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        settings = parse(model_args)
        self.settings = dataclasses.replace(settings, device=_process_device(settings.device))
        self.runner = Runner(self.settings)

    def unpack(self, request: Instance) -> Request:
        """The :class:`~.runner.Request` of a simple ``generate_until`` instance."""
        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = _six(request)
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return Request(task=task, doc_id=doc_id, text=ctx, images=[_image(v, task, doc_id) for v in visuals],
                       generation=dict(gen_kwargs))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The answers, in the order of ``requests``; the report file is written (again) afterwards."""
        unpacked = [self.unpack(r) for r in requests]
        groups: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(unpacked):
            groups.setdefault((r.task, json.dumps(r.generation, sort_keys=True, default=str)), []).append(i)
        answers: list[str] = [""] * len(requests)
        size = self.settings.batch_size
        with tqdm(total=len(requests), desc=f"tokensieve {self.settings.method}", unit="request",
                  disable=self.rank != 0) as bar:
            for members in groups.values():
                members.sort(key=lambda i: unpacked[i].doc_id)
                for lo in range(0, len(members), size):
                    chunk = members[lo : lo + size]
                    for i, answer in zip(chunk, self.runner.generate([unpacked[i] for i in chunk])):
                        answers[i] = answer
                    bar.update(len(chunk))
        if self.settings.report is not None and requests:
            self.runner.write_report(self.report_path(self.settings.report))
        return answers

    def report_path(self, path: Path) -> Path:
        """This process's report file: ``path``, with ``.rank<R>`` before its suffix when several
        processes share the run."""
        return path if self.world_size == 1 else path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"tokensieve's lmms-eval model answers {SUPPORTED} only, not loglikelihood "
                                  "(multiple_choice and loglikelihood tasks)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"tokensieve's lmms-eval model answers {SUPPORTED} only, not generate_until_multi_round")


class TokensieveChat(TokensieveSimple):
    """tokensieve in lmms-eval, chat requests: the task's messages (``doc_to_messages``)."""

    is_simple = False

    def unpack(self, request: Instance) -> Request:
        """The :class:`~.runner.Request` of a chat ``generate_until`` instance: its messages with each
        image taken out into ``images`` and left as a ``{"type": "image"}`` placeholder."""
        ctx, doc_to_messages, gen_kwargs, doc_id, task, split = _six(request)
        images: list[Image.Image] = []
        messages = []
        for message in doc_to_messages(self.task_dict[task][split][doc_id]):
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            placed = []
            for part in parts:
                if part["type"] == "image":
                    images.append(_image(part.get("url", part.get("image")), task, doc_id))
                    placed.append({"type": "image"})
                elif part["type"] == "text":
                    placed.append({"type": "text", "text": part["text"]})
                else:
                    raise ValueError(f"{task} doc {doc_id}: tokensieve takes images and text, not {part['type']}")
            messages.append({"role": message["role"], "content": placed})
        return Request(task=task, doc_id=doc_id, text=ctx, images=images, generation=dict(gen_kwargs), messages=messages)


def _six(request: Instance) -> tuple:
    """A ``generate_until`` instance's 6 arguments (refusing any other request type)."""
    if request.request_type != "generate_until":
        raise NotImplementedError(f"tokensieve's lmms-eval model answers {SUPPORTED} only, not {request.request_type}")
    if len(request.args) != 6:
        raise ValueError(f"a generate_until request of lmms-eval 0.7.3 has 6 arguments, this one {len(request.args)}")
    return request.args


def _image(visual: Any, task: str, doc_id: int) -> Image.Image:
    """A request's visual as an RGB image (tokensieve takes images, not videos or audio)."""
    if not isinstance(visual, Image.Image):
        raise ValueError(f"{task} doc {doc_id}: tokensieve takes images, got {type(visual).__name__}")
    return visual.convert("RGB")


def _process_device(device: str) -> str:
    """This process's device: under several processes (``WORLD_SIZE`` above 1) ``auto`` or ``cuda``
    is ``cuda:LOCAL_RANK``; otherwise ``device`` itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
