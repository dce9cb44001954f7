"""Task accuracy of a pruned model against the same model unpruned, on the same samples.

For each batch of held-out items the model generates greedily twice: unpruned, then inside
``prune()``. Accuracy, agreement with the unpruned answers, visual tokens kept, FLOPs (from the
ledger), time to first token, decode time per token and KV bytes are aggregated over the samples.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from . import __version__, methods, protocols
from .compat import TRANSFORMERS_VERSION
from .engine import prune
from .protocols import Protocol
from .tasks import TASKS, TEXT_TASKS, VIDEO_QA_TASKS, Example, TextExample, generate
from .timing import ForwardTimer

TEST_ITEMS = 500
"""Size of each task's fixed held-out test split: test items 0..499."""
SUITES: dict[str, tuple[str, ...]] = {"image": TASKS, "text": TEXT_TASKS, "video": VIDEO_QA_TASKS}
"""The task suites; a model runs one (``Prompting.suite``), which ``--task all`` means."""


@dataclass
class Prompting:
    """How a model is prompted with task examples and how its answers are read. ``text``: a text
    model given a bare tokenizer (the shipped ``tiny-text``), prompted with the text tasks' own prompts;
    ``video``: the shipped video model's frame processor, prompted with the video questions."""

    processor: Any
    tiny: bool
    text: bool = False
    video: bool = False

    @classmethod
    def for_processor(cls, processor: Any) -> "Prompting":
        """The text tasks' prompts for a bare tokenizer (the tiny text model); the video questions for
        the tiny video model's frame processor; the shipped model's prompt format for processors without
        a chat template (the tiny model and checkpoints retrained with ``tokensieve train-tiny``), the
        chat template otherwise."""
        from transformers import PreTrainedTokenizerBase

        from .tiny_video.processor import FrameVideoProcessor

        text = isinstance(processor, PreTrainedTokenizerBase)
        video = isinstance(processor, FrameVideoProcessor)
        return cls(processor, tiny=text or video or getattr(processor, "chat_template", None) is None, text=text,
                   video=video)

    @property
    def suite(self) -> str:
        """The task suite this model runs: "text", "video" or "image"."""
        return "text" if self.text else "video" if self.video else "image"

    @property
    def max_new_tokens(self) -> int:
        """Tokens to generate: enough for the longest answer of the suite and its end token."""
        if self.text:
            from .tiny_text import MAX_NEW_TOKENS

            return MAX_NEW_TOKENS
        return 3

    def inputs(self, examples: list[Example] | list[TextExample]) -> Any:
        if self.text:
            from .tiny_text import build_inputs

            return build_inputs(self.processor, examples)
        if self.video:
            from .tiny_video import build_inputs

            return build_inputs(self.processor, examples)
        if self.tiny:
            from .tiny import build_inputs

            return build_inputs(self.processor, examples)
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{e.question} Answer with one word."}]}]
            for e in examples
        ]
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.processor(images=[e.image for e in examples], text=texts, padding=True, return_tensors="pt")

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (the processor's, for a VLM)."""
        return self.processor if self.text else self.processor.tokenizer

    def answers(self, generated: torch.Tensor, prompt_len: int) -> list[str]:
        tokenizer = self.tokenizer
        if self.tiny:
            from .tiny import parse_answers

            return parse_answers(tokenizer, generated, prompt_len)
        out = []
        for text in tokenizer.batch_decode(generated[:, prompt_len:], skip_special_tokens=True):
            words = text.strip().lower().split()
            out.append(words[0].strip(".,!?;:") if words else "")
        return out


def device_name(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:N"`` (a bare ``cuda`` is the current CUDA device)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return str(device)


def runtime(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What results recorded on ``device`` in ``dtype`` depend on besides the method: device, dtype,
    torch and transformers versions."""
    return {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": str(TRANSFORMERS_VERSION)}


def model_runtime(model: Any) -> dict[str, str]:
    """:func:`runtime` of where ``model``'s weights are."""
    weight = next(model.parameters())
    return runtime(weight.device, weight.dtype)


def model_inputs(inputs: Any, model: Any) -> dict[str, Any]:
    """``inputs`` on ``model``'s device, floating-point tensors (pixel values) in its dtype."""
    weight = next(model.parameters())
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(weight.device, weight.dtype) if value.is_floating_point() else value.to(weight.device)
        moved[key] = value
    return moved


def resolve_tasks(task: str, suite: str | None = None) -> list[str]:
    """The task names ``task`` stands for: itself, or for "all" the tasks of ``suite`` ("image",
    "text" or "video"; see ``SUITES``). ``suite`` None (the model not known yet) accepts a task of any
    suite and reads "all" as the image tasks."""
    valid = sum(SUITES.values(), ()) if suite is None else SUITES[suite]
    if task == "all":
        return list(SUITES[suite or "image"])
    if task not in valid:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(valid)}, all")
    return [task]


def _chunks(items: list[Example], size: int) -> Iterable[list[Example]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


@torch.no_grad()
def evaluate(
    model: Any,
    prompting: Prompting,
    task: str,
    method: str = "none",
    options: dict[str, Any] | None = None,
    limit: int = TEST_ITEMS,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool | Any = True,
    baseline: dict[str, Any] | None = None,
    protocol: Protocol = "auto",
) -> dict[str, Any]:
    """Evaluate ``method`` on the first ``limit`` test items of ``task`` ("all" for every task of the
    model's suite: the text tasks for a text model, the image tasks otherwise).

    Returns the JSON-ready result: accuracy, baseline_accuracy, agreement, visual_tokens_kept (mean
    and per layer), tflops, tflops_unpruned (per-sample means), ttft_ms and decode_ms_per_token
    (medians over batches / steps), kv_bytes and kv_bytes_unpruned (per-sample means after prefill),
    per-task accuracies, per-item answers, visual tokens entering each layer and FLOPs ratio
    (``items``: instance-adaptive methods such as ATP keep their own counts), and the settings (with the
    device, dtype, torch and transformers versions).

    ``baseline``: an earlier result of method "none" on the same items, reused instead of generating
    the unpruned answers again. ``progress``: a bool, or a tqdm bar to advance. ``max_new_tokens``: by
    default the prompting's (3 for the image tasks, 5 for the text tasks). ``protocol``: ``"whole"``
    (one prefill of the whole prompt) or ``"question-after"`` (the context prefilled first, the question
    fed after it: see :mod:`tokensieve.protocols`); KV bytes are then measured after the context.

    Inputs go to the model's device (pixel values in its dtype). Before any timing, one untimed
    generation on the first batch takes the one-off costs of a first call (kernel selection, memory
    allocation), which would otherwise land in the first batch's time to first token.
    """
    options = dict(options or {})
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    methods.get(method, **options)  # validate the name and options before any work
    protocol = protocols.resolve(protocol, prompting.text)
    tasks = resolve_tasks(task, prompting.suite)
    max_new_tokens = prompting.max_new_tokens if max_new_tokens is None else max_new_tokens
    examples = [e for t in tasks for e in generate(t, "test", limit)]
    if baseline is not None and len(baseline["items"]) != len(examples):
        raise ValueError("the baseline result covers other items")
    if baseline is not None and baseline["settings"].get("protocol", "whole") != protocol:
        raise ValueError("the baseline result was measured under another protocol")
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(examples), desc=f"eval {method}", unit="item", disable=not progress) if own_bar else progress
    rows: list[dict[str, Any]] = []
    timing: dict[str, list[float]] = {"prefill": [], "decode": [], "base_prefill": [], "base_decode": []}
    report = None
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False)
    chunks = list(_chunks(examples, batch_size))
    calls = 1 if protocol == "whole" else 2
    pad_id = prompting.tokenizer.pad_token_id

    def run_chunk(inputs: dict[str, Any], question: list[int] | None) -> tuple[torch.Tensor, int]:
        out, prompt_len, _ = protocols.generate(model, inputs, generation, protocol, question, pad_id)
        return out, prompt_len

    def prepared(chunk: list) -> tuple[dict[str, Any], list[int] | None]:
        inputs = model_inputs(prompting.inputs(chunk), model)
        question = None if protocol == "whole" else protocols.question_lengths(prompting, chunk, inputs, model)
        return inputs, question

    first = prepared(chunks[0])
    with prune(model, method, **options):
        run_chunk(*first)  # untimed warm-up: the first call pays one-off costs
    for i, chunk in enumerate(chunks):
        inputs, question = first if i == 0 else prepared(chunk)
        with prune(model, method, **options) as run, ForwardTimer(model) as timer:
            timer.start(calls)
            out, prompt_len = run_chunk(inputs, question)
        report = run.report
        answers = prompting.answers(out, prompt_len)
        timing["prefill"] += timer.prefill_ms
        timing["decode"] += timer.decode_ms
        if method == "none":
            base_answers = answers
        elif baseline is not None:
            base_answers = [item["predicted"] for item in baseline["items"][len(rows) : len(rows) + len(chunk)]]
        else:
            with ForwardTimer(model) as timer:
                timer.start(calls)
                base_out, _ = run_chunk(inputs, question)
            base_answers = prompting.answers(base_out, prompt_len)
            timing["base_prefill"] += timer.prefill_ms
            timing["base_decode"] += timer.decode_ms
        for example, answer, base, sample in zip(chunk, answers, base_answers, report.samples):
            rows.append({"task": example.task, "answer": example.answer, "predicted": answer, "baseline": base,
                         "visual": sample.visual_lengths, "flops": sample.flops, "flops_unpruned": sample.flops_unpruned,
                         "kv": sample.kv_bytes_prefill})
        bar.update(len(chunk))
    if own_bar:
        bar.close()
    if method == "none":
        timing["base_prefill"], timing["base_decode"] = timing["prefill"], timing["decode"]
    elif baseline is not None:
        timing["base_prefill"], timing["base_decode"] = baseline["timing"]["prefill"], baseline["timing"]["decode"]
    settings = {"model": getattr(model.config, "_name_or_path", ""), "tasks": tasks, "method": method,
                "options": report.options, "positions": report.positions, "limit": limit, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "protocol": protocol, "items": "test split items 0..limit-1 of each task",
                "tokensieve": __version__, **model_runtime(model)}
    return summarise(rows, tasks, timing, settings)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarise(rows: list[dict[str, Any]], tasks: list[str], timing: dict[str, list[float]], settings: dict[str, Any]) -> dict[str, Any]:
    """Aggregate per-sample rows into the result dict."""
    layers = len(rows[0]["visual"])
    per_layer = [_mean(r["visual"][l] for r in rows) for l in range(layers)]
    return {
        "accuracy": _mean(r["predicted"] == r["answer"] for r in rows),
        "baseline_accuracy": _mean(r["baseline"] == r["answer"] for r in rows),
        "agreement": _mean(r["predicted"] == r["baseline"] for r in rows),
        "per_task": {
            t: {
                "accuracy": _mean(r["predicted"] == r["answer"] for r in rows if r["task"] == t),
                "baseline_accuracy": _mean(r["baseline"] == r["answer"] for r in rows if r["task"] == t),
                "agreement": _mean(r["predicted"] == r["baseline"] for r in rows if r["task"] == t),
            }
            for t in tasks
        },
        "visual_tokens_kept": {"mean": _mean(per_layer), "per_layer": per_layer},
        "tflops": _mean(r["flops"] for r in rows) / 1e12,
        "tflops_unpruned": _mean(r["flops_unpruned"] for r in rows) / 1e12,
        "ttft_ms": _median(timing["prefill"]),
        "decode_ms_per_token": _median(timing["decode"]),
        "ttft_ms_unpruned": _median(timing["base_prefill"]),
        "decode_ms_per_token_unpruned": _median(timing["base_decode"]),
        "kv_bytes": _mean(r["kv"] for r in rows),
        "samples": len(rows),
        "settings": settings,
        "timing": {"prefill": timing["prefill"], "decode": timing["decode"]},
        "items": [{"task": r["task"], "answer": r["answer"], "predicted": r["predicted"], "visual_tokens": r["visual"],
                   "flops_ratio": r["flops"] / r["flops_unpruned"]} for r in rows],
    }


def calibration_examples(task: str, samples: int, seed: int = 0, suite: str | None = None) -> list[Example]:
    """``samples`` training-split items spread evenly over the task(s) (``"all"``: those of ``suite``),
    the ``seed``-th such draw."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be at least 1, got {samples}")
    tasks = resolve_tasks(task, suite)
    per_task = -(-samples // len(tasks))
    pools = [generate(t, "train", per_task, start=seed * per_task) for t in tasks]
    mixed = [pool[i] for i in range(per_task) for pool in pools]
    return mixed[:samples]


def calibrate_on_tasks(model: Any, prompting: Prompting, task: str, budget: float, samples: int = 64, seed: int = 0,
                       batch_size: int = 64, visual_only: bool = False, model_name: str = "", progress: bool = True,
                       search: str = "release"):
    """Fit a FitPrune recipe on training-split items of the task suite (``search``: see
    :func:`tokensieve.calibration.calibrate`); the recipe's ``extra`` records the device, dtype, torch
    and transformers versions."""
    from .calibration import calibrate

    batches = calibration_batches(model, prompting, task, samples, seed, batch_size)
    describe = _calibration_record(model, task, samples, seed, model_name, prompting.suite)
    return calibrate(model, batches, budget, visual_only=visual_only, progress=progress, describe=describe, search=search)


def fit_schedules_on_tasks(model: Any, prompting: Prompting, method: str, budgets: list[float], task: str = "all",
                           options: dict[str, Any] | None = None, samples: int = 64, seed: int = 0,
                           batch_size: int = 64, step: float = 1 / 16, model_name: str = "", progress: bool = True):
    """Fit ``method``'s schedule for each FLOPs budget on training-split items of the task suite (see
    :func:`tokensieve.schedule_fitting.fit_schedules`); each recipe's ``extra`` records the device,
    dtype, torch and transformers versions."""
    from .schedule_fitting import fit_schedules

    batches = calibration_batches(model, prompting, task, samples, seed, batch_size)
    describe = _calibration_record(model, task, samples, seed, model_name, prompting.suite)
    return fit_schedules(model, batches, method, budgets, options=options, step=step, progress=progress, describe=describe)


def _calibration_record(model: Any, task: str, samples: int, seed: int, model_name: str, suite: str) -> dict[str, Any]:
    """What a fitted recipe records of its calibration set and runtime."""
    return {"model": model_name, "seed": seed,
            "calibration": f"tasks={','.join(resolve_tasks(task, suite))} split=train items {seed}*k.. ({samples} samples)",
            **model_runtime(model)}


def calibration_batches(model: Any, prompting: Prompting, task: str, samples: int, seed: int = 0,
                        batch_size: int = 64) -> list[dict[str, Any]]:
    """:func:`calibration_examples` as model inputs of ``batch_size`` samples, on the model's device."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    examples = calibration_examples(task, samples, seed, prompting.suite)
    return [model_inputs(prompting.inputs(chunk), model) for chunk in _chunks(examples, batch_size)]
