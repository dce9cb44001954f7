"""Does LazyLLM's prefill realise the time-to-first-token speedup its FLOPs promise?

A Llama-2-7B-shaped decoder (hidden 4096, 32 heads, intermediate 11008) with only ``--layers`` decoder
layers and random weights, fp32, on the CPU; one prompt of ``--tokens`` random tokens, batch 1. The
time to first token is one prefill forward as ``generate()`` runs it (a fresh cache, the last row's
logits only), timed for the plain model and under ``tokensieve.prune(model, "lazyllm", ...)`` (its
defaults unless ``--keep`` / ``--prune-layers``), interleaved repeat by repeat so that drift in the
machine's load affects both alike; the median of each is compared:

    predicted = unpruned / pruned analytic prefill FLOPs (``tokensieve.flops.prefill_flops`` over the
                tokens each layer computed, the run's report)
    measured  = plain median TTFT / LazyLLM median TTFT
    ratio     = measured / predicted       (1.0: the speedup the FLOPs promise, realised)

``--keep-everything`` also times ``keep=1`` (nothing pruned: the engine's own overhead).

    python benchmarks/lazyllm_ttft.py --layers 4 --tokens 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tokensieve
from tokensieve import compat
from tokensieve.flops import Shape, prefill_flops


def build(layers: int, vocab: int) -> LlamaForCausalLM:
    """The 7B-shaped decoder with ``layers`` layers, random weights, SDPA, fp32, eval mode."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def ttft(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    """Seconds of one prefill forward: fresh cache, logits of the last row only (as ``generate()``)."""
    keyword = compat.cache_keyword(type(model).forward)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
              **{keyword: DynamicCache()})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", type=float, default=None, help="LazyLLM's keep (default: the method's)")
    parser.add_argument("--prune-layers", type=int, nargs="+", default=None, help="LazyLLM's layers")
    parser.add_argument("--keep-everything", action="store_true", help="also time keep=1 (the overhead)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.vocab)
    ids = torch.randint(3, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    options = {k: v for k, v in (("keep", args.keep), ("layers", args.prune_layers and tuple(args.prune_layers))) if v}
    runs = {"plain": None, "lazyllm": options}
    if args.keep_everything:
        runs["lazyllm keep=1"] = dict(options, keep=1.0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    lengths: dict[str, list[int]] = {}
    ttft(model, ids[:, :64])  # warm-up
    for _ in range(args.repeats):
        for name, opts in runs.items():
            if opts is None:
                times[name].append(ttft(model, ids))
                continue
            with tokensieve.prune(model, "lazyllm", **opts) as run:
                times[name].append(ttft(model, ids))
            lengths[name] = run.report.samples[0].hidden_lengths
    shape = Shape.from_config(model.config)
    full = prefill_flops(shape, [args.tokens] * args.layers)
    plain = statistics.median(times["plain"])
    print(f"{args.layers} layers of a 7B-shaped Llama, {args.tokens} tokens, batch 1, fp32, "
          f"{args.threads} threads, {args.repeats} interleaved repeats (medians)")
    print(f"{'run':<16} {'tokens per layer':<28} {'TTFT s':>8} {'predicted':>10} {'measured':>9} {'ratio':>6}")
    print(f"{'plain':<16} {[args.tokens] * args.layers!s:<28} {plain:>8.2f} {'1.00':>10} {'1.00':>9} {'':>6}")
    for name in runs:
        if name == "plain":
            continue
        t = statistics.median(times[name])
        predicted = full / prefill_flops(shape, lengths[name])
        measured = plain / t
        print(f"{name:<16} {lengths[name]!s:<28} {t:>8.2f} {predicted:>10.2f} {measured:>9.2f} {measured / predicted:>6.2f}")
    for name, seconds in times.items():
        print(f"{name} TTFT per repeat (s): {', '.join(f'{t:.2f}' for t in seconds)}")


if __name__ == "__main__":
    main()
