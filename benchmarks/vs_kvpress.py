"""tokensieve's KV-cache methods side by side with NVIDIA kvpress's presses, on the same model and items.

Run it in its own virtual environment (kvpress 0.5.5 pins ``transformers<5.3``):

    python -m venv venv-kvpress && venv-kvpress/bin/pip install torch==2.13.0 "kvpress==0.5.5" "transformers>=5.2,<5.3"
    venv-kvpress/bin/pip install --no-deps -e .
    venv-kvpress/bin/python benchmarks/vs_kvpress.py --limit 50 --keep 0.75,0.5,0.25 --json results/vs_kvpress.json

Protocol, the same on both sides and kvpress's own (its ``kv-press-text-generation`` pipeline): each
item's prompt is split into the context (everything before the question) and the question with the
answer cue; the context is prefilled with compression active, then the question is fed after it and
the answer decoded greedily. tokensieve: the context, the question and the decoding all run inside
``tokensieve.prune()`` (methods that evict at every step keep doing so); kvpress: the context runs
inside ``with press(model)``, the question and the decoding after it (kvpress compresses the prefill
only), and ``DecodingPress`` rows wrap a press so it also compresses while decoding. ``keep`` is
tokensieve's fraction of the context's cache entries kept per layer; kvpress's
``compression_ratio = 1 - keep``.

Pairs (tokensieve method: kvpress press): ``snapkv``: ``SnapKVPress`` (same window and kernel);
``streamingllm``: ``StreamingLLMPress`` (4 sinks; tokensieve's window is the budget less the sinks,
original positions as kvpress keeps them); ``h2o``: ``ObservedAttentionPress`` (attention received,
prefill only) and ``DecodingPress(ObservedAttentionPress)``; ``a2sf``: the closest is
``ObservedAttentionPress`` too (kvpress has no forgetting factor); ``pagedeviction``: ``KnormPress``
(kvpress's norm-based press: key norms only, no blocks). The ``heads=shared`` rows are tokensieve's
one-set-per-layer variant of its per-head default (kvpress's presses keep a set per KV head).

Per cell: accuracy, time to first token (context + question, ms), decode ms per token, the KV bytes
the cache tensors hold after the context and at their peak over the item (measured; a paged cache:
its block pools), and the peak resident memory of the process while an item runs (Linux ``VmHWM``,
reset before each item; the model and the interpreter included). Everything runs batch 1, fp32, eager
attention (``ObservedAttentionPress`` needs the attention weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import DynamicCache

import tokensieve
from tokensieve.tasks import TEXT_TASKS, generate
from tokensieve.tiny_text import MAX_NEW_TOKENS, load_tiny_text

WINDOW, KERNEL, SINKS = 32, 5, 4


def split(example, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, c)`` context ids and ``(1, q)`` question ids (the question and the answer cue)."""
    cut = example.prompt.rindex(example.question)
    context = tokenizer(example.prompt[:cut].strip(), add_special_tokens=False, return_tensors="pt").input_ids
    question = tokenizer(example.prompt[cut:], add_special_tokens=False, return_tensors="pt").input_ids
    return context, question


def peak_rss_reset() -> None:
    """Reset the process's peak resident set size (Linux: ``/proc/self/clear_refs``); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    """The process's peak resident set size since the last reset (Linux ``VmHWM``), MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes the cache's key and value tensors hold (a tokensieve paged cache: its block pools)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def answer(model, tokenizer, context: torch.Tensor, question: torch.Tensor, around: Callable) -> dict[str, Any]:
    """Greedy answer after the compressed context, all of it inside the context manager ``around()``
    (kvpress's presses compress the prefill only, so the question and the decoding run uncompressed
    under them, as in kvpress's pipeline, unless wrapped in ``DecodingPress``)."""
    cache = DynamicCache()
    peak_rss_reset()
    with torch.no_grad(), around():
        start = time.perf_counter()
        model(input_ids=context, past_key_values=cache, use_cache=True)
        stored = kv_bytes(cache)
        # positions after the whole context, as kvpress's pipeline passes them (generate_answer): a
        # compressed cache's length is not the context's
        at = torch.arange(context.shape[1], context.shape[1] + question.shape[1])[None]
        out = model(input_ids=question, past_key_values=cache, position_ids=at, use_cache=True)
        ttft = time.perf_counter() - start
        peak = max(stored, kv_bytes(cache))
        ids, steps = [], []
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(MAX_NEW_TOKENS):
            ids.append(int(token))
            if ids[-1] == tokenizer.eos_token_id:
                break
            t0 = time.perf_counter()
            at = at[:, -1:] + 1
            out = model(input_ids=token, past_key_values=cache, position_ids=at, use_cache=True)
            steps.append(time.perf_counter() - t0)
            peak = max(peak, kv_bytes(cache))
            token = out.logits[:, -1:].argmax(-1)
    text = tokenizer.decode([i for i in ids if i != tokenizer.eos_token_id]).strip()
    return {"text": text, "ttft_ms": 1000 * ttft, "decode_ms": [1000 * s for s in steps], "kv_bytes": stored,
            "peak_kv_bytes": peak, "peak_rss_mib": peak_rss_mib()}


def cells(model, keep: float, context_len: int) -> dict[str, Callable]:
    """Per row name, a callable giving the context manager the whole item runs in."""
    from kvpress import (
        DecodingPress,
        KnormPress,
        ObservedAttentionPress,
        SnapKVPress,
        StreamingLLMPress,
    )

    ratio = 1 - keep
    budget = max(1, round(keep * context_len))

    def ours(method: str, **options) -> Callable:
        return lambda: tokensieve.prune(model, method, **options)

    def press(p) -> Callable:
        return lambda: p(model)

    return {
        "tokensieve snapkv": ours("snapkv", budget=max(budget, WINDOW + 1), window=WINDOW, kernel_size=KERNEL),
        "tokensieve snapkv heads=shared": ours("snapkv", budget=max(budget, WINDOW + 1), window=WINDOW,
                                               kernel_size=KERNEL, heads="shared"),
        "kvpress SnapKVPress": press(SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)),
        "tokensieve streamingllm": ours("streamingllm", sinks=SINKS, window=max(1, budget - SINKS), positions="keep"),
        "kvpress StreamingLLMPress": press(StreamingLLMPress(compression_ratio=ratio, n_sink=SINKS)),
        "tokensieve h2o": ours("h2o", keep=keep),
        "tokensieve h2o heads=shared": ours("h2o", keep=keep, heads="shared"),
        "kvpress ObservedAttentionPress": press(ObservedAttentionPress(compression_ratio=ratio)),
        "kvpress DecodingPress(ObservedAttentionPress)": press(DecodingPress(base_press=ObservedAttentionPress(compression_ratio=ratio))),
        "tokensieve a2sf": ours("a2sf", keep=keep),
        "tokensieve a2sf heads=shared": ours("a2sf", keep=keep, heads="shared"),
        "tokensieve pagedeviction": ours("pagedeviction", keep=keep),
        "kvpress KnormPress": press(KnormPress(compression_ratio=ratio)),
    }


def markdown(table: dict[str, dict[str, Any]]) -> str:
    """The table as markdown rows: row, keep, accuracy, TTFT, decode ms/token, KV KiB after the context
    and at peak, peak RSS."""
    lines = ["| row | keep | accuracy | TTFT ms | decode ms/token | KV KiB after context | peak KV KiB | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        row, keep = name.rsplit(" @ keep ", 1)
        decode = "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.1f}"
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {row} | {keep} | {r['accuracy']:.3f} | {r['ttft_ms']:.1f} | {decode} | "
                     f"{r['kv_bytes_after_context'] / 1024:.0f} | {r['peak_kv_bytes'] / 1024:.0f} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=50, help="test items per task")
    parser.add_argument("--tasks", default="all", help="comma list of text tasks (default: all of them)")
    parser.add_argument("--keep", default="0.75,0.5,0.25")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--untrained", action="store_true",
                        help="the shipped text model's architecture with random weights: a mechanics check only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.untrained:
        from tokensieve.tiny_text.build import build_config, build_model, build_tokenizer

        torch.manual_seed(0)
        tokenizer = build_tokenizer()
        model = build_model(build_config(tokenizer)).eval()
    else:
        model, tokenizer = load_tiny_text()
    model.config._attn_implementation = "eager"
    tasks = list(TEXT_TASKS) if args.tasks == "all" else args.tasks.split(",")
    examples = [e for t in tasks for e in generate(t, "test", args.limit)]
    rows: dict[str, dict[str, Any]] = {}
    import kvpress

    for keep in (float(k) for k in args.keep.split(",")):
        for example in tqdm(examples, desc=f"keep {keep}", unit="item"):
            context, question = split(example, tokenizer)
            for name, around in cells(model, keep, context.shape[1]).items():
                got = answer(model, tokenizer, context, question, around)
                row = rows.setdefault(f"{name} @ keep {keep}", {"right": [], "ttft_ms": [], "decode_ms": [], "kv_bytes": [],
                                                                "peak_kv_bytes": [], "peak_rss_mib": []})
                row["right"].append(got["text"] == example.answer)
                row["ttft_ms"].append(got["ttft_ms"])
                row["decode_ms"] += got["decode_ms"]
                for key in ("kv_bytes", "peak_kv_bytes", "peak_rss_mib"):
                    row[key].append(got[key])
    table = {name: {"accuracy": sum(r["right"]) / len(r["right"]), "ttft_ms": statistics.median(r["ttft_ms"]),
                    "decode_ms_per_token": statistics.median(r["decode_ms"]) if r["decode_ms"] else None,
                    "kv_bytes_after_context": statistics.mean(r["kv_bytes"]), "peak_kv_bytes": max(r["peak_kv_bytes"]),
                    "peak_rss_mib": max(r["peak_rss_mib"]) if None not in r["peak_rss_mib"] else None,
                    "items": len(r["right"])}
             for name, r in rows.items()}
    result = {"table": table, "settings": vars(args), "versions": {"torch": torch.__version__,
              "tokensieve": tokensieve.__version__, "kvpress": getattr(kvpress, "__version__", "0.5.5")}}
    print(json.dumps(result, indent=1))
    print(markdown(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
