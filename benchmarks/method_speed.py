"""Does every method realise the speedup its FLOPs promise? One run over every registered method.

A LLaVA-1.5-7B-shaped model with random weights (LLM widths of Vicuna-7B, ``--layers`` decoder layers;
a CLIP-L/336 tower of ``--vision-layers`` layers) and one prompt of 576 visual + ``--text-tokens`` text
tokens. For each prefill and encoder method at ``flops=--flops`` (FitPrune: a fixed recipe near it), the
whole model's prefill time (the top-level forward: vision tower, projector, LLM and every engine hook,
the report included) is measured against the plain model's, interleaved repeat by repeat so that drift
in the machine's load affects all alike:

    achieved  = plain LLM ms / method LLM ms
    predicted = unpruned / pruned analytic LLM prefill FLOPs (the method's own report; the tower and
                projector are a fixed cost it does not count, so keep --vision-layers small)
    ratio     = achieved / predicted          (1.0: the method realises what its FLOPs promise)

and, with every method set to keep everything, the overhead of the shims alone (method / plain - 1).
Cache-stage methods (``keep=0.5``, so that they evict) are timed per decode step against plain decoding.

    python benchmarks/method_speed.py --layers 6 --repeats 3 --json results/method_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import tokensieve
from tokensieve import compat, methods
from tokensieve.timing import ForwardTimer

IMAGE_TOKEN = 32000
CACHE_OPTIONS = {"streamingllm": {"sinks": 4, "window": 316}, "pagedeviction": {"keep": 0.5, "block_size": 16}}
"""Cache methods' options: about half of the 640-token prompt kept (``keep=0.5`` for the others)."""
PATCHES = 576


def build(layers: int, vision_layers: int) -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg)
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = "sdpa"
    return model.eval()


def prompt(text_tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    before = torch.randint(3, 30000, (1, 5), generator=gen)
    after = torch.randint(3, 30000, (1, text_tokens - 5), generator=gen)
    ids = torch.cat([before, torch.full((1, PATCHES), IMAGE_TOKEN), after], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 336, 336, generator=gen)}


def settings(layers: int, flops: float) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Per prefill / encoder method: (options at the budget, options that keep everything)."""
    third = max(1, layers // 3)
    recipe = {"removed": {"1": 230, "2": 115, "3": 58}, "visual_tokens": PATCHES, "num_layers": layers}
    out = {
        "fastv": ({"layer": 2, "flops": flops}, {"keep": 1.0}),
        "fitprune": ({"recipe": recipe}, {"recipe": {"removed": {}, "visual_tokens": PATCHES, "num_layers": layers}}),
        "random": ({"flops": flops}, {"keep": 1.0}),
        "pool": ({"flops": flops}, {"keep": 1.0}),
        "divprune": ({"flops": flops}, {"keep": 1.0}),
        "fastervlm": ({"flops": flops}, {"keep": 1.0}),
        "dart": ({"flops": flops}, {"keep": 1.0}),
        "pdrop": ({"flops": flops}, {"ratio": 1.0}),
        "visionzip": ({"flops": flops}, {"keep": 1.0}),
        "tome": ({"flops": flops}, {"keep": 1.0}),
        "transprune": ({"flops": flops}, {"layers": (1, 2, 3), "keep": (1.0, 1.0, 1.0)}),
        "aim": ({"flops": flops}, {"merge_keep": 1.0, "start": layers - 1, "stop": layers - 1}),
        "vflowopt": ({"flops": flops, "layers": (third, 2 * third)}, {"vit_keep": 1.0, "stage_keep": (1.0, 1.0),
                                                                     "layers": (third, 2 * third)}),
        "lazyllm": ({}, {"keep": 1.0}),  # no flops option: its defaults (keep 0.7 at three layers, ~0.6 of the FLOPs at 6 layers)
    }
    missing = {name for name, cls in methods.REGISTRY.items() if "cache" not in cls.stages} - set(out) - {"none"}
    if missing:
        raise SystemExit(f"no benchmark setting for {sorted(missing)}: add them to settings()")
    return out


def median_ms(calls: dict[str, Callable[[], float]], repeats: int, label: str) -> dict[str, float]:
    """Median of each call's returned milliseconds, the calls interleaved within every repeat (one
    untimed warm-up turn first)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in tqdm(range(repeats + 1), desc=label, unit="turn", leave=False):
        for name, call in calls.items():
            ms = call()
            if i:
                times[name].append(ms)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--methods", help="comma list (default: every prefill and encoder method)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.layers, args.vision_layers)
    batch = prompt(args.text_tokens)
    table = settings(args.layers, args.flops)
    chosen = args.methods.split(",") if args.methods else None
    names = [n for n in (chosen or sorted(table)) if n in table]
    reports: dict[str, Any] = {}

    def prefill(name: str | None, options: dict[str, Any], key: str = "") -> Callable[[], float]:
        def call() -> float:
            with torch.no_grad():
                if name is None:
                    with ForwardTimer(model) as timer:
                        model(**batch, use_cache=True, logits_to_keep=1)
                else:  # the timer inside prune(): its hooks wrap the engine's (ForwardTimer's docstring)
                    with tokensieve.prune(model, name, **options) as run, ForwardTimer(model) as timer:
                        model(**batch, use_cache=True, logits_to_keep=1)
                    reports[key] = run.report
            return timer.prefill_ms[0]
        return call

    result: dict[str, Any] = {"settings": vars(args), "device": f"cpu ({args.threads} threads)", "dtype": "float32",
                              "tokens": PATCHES + args.text_tokens, "versions": {"torch": torch.__version__,
                              "tokensieve": tokensieve.__version__}, "methods": {}}
    for name in tqdm(names, desc="methods", unit="method"):
        budget, keep_all = table[name]
        ms = median_ms({"plain": prefill(None, {}), "pruned": prefill(name, budget, name)}, args.repeats, name)
        predicted = 1 / reports[name].flops_ratio
        ms_all = median_ms({"plain": prefill(None, {}), "kept": prefill(name, keep_all, "keep-all")}, args.repeats,
                           f"{name} keep-all")
        result["methods"][name] = {
            "options": {k: v for k, v in budget.items() if k != "recipe"}, "flops_ratio": reports[name].flops_ratio,
            "plain_ms": ms["plain"], "pruned_ms": ms["pruned"], "speedup_predicted": predicted,
            "speedup_achieved": ms["plain"] / ms["pruned"], "ratio": ms["plain"] / ms["pruned"] / predicted,
            "overhead_keep_all": ms_all["kept"] / ms_all["plain"] - 1,
        }
        print(json.dumps({name: result["methods"][name]}), flush=True)
    cache_names = [n for n, cls in methods.REGISTRY.items() if "cache" in cls.stages and (chosen is None or n in chosen)]
    for name in cache_names:
        result["methods"][name] = decode_speed(model, batch, name, args.decode_steps, args.repeats)
        print(json.dumps({name: result["methods"][name]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown(result["methods"]))


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """The result as the tables of docs/benchmarks.md."""
    out = ["| method | FLOPs ratio | predicted | achieved | ratio | keep-all overhead |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "ratio" in r:
            out.append(f"| {name} | {r['flops_ratio']:.3f} | {r['speedup_predicted']:.2f}x | {r['speedup_achieved']:.2f}x "
                       f"| {r['ratio']:.3f} | {100 * r['overhead_keep_all']:+.1f}% |")
    decode = [(n, r) for n, r in rows.items() if "decode_ratio" in r]
    if decode:
        out += ["", "| cache method | plain ms/token | method ms/token | ratio |", "|---|---|---|---|"]
        out += [f"| {n} | {r['plain_decode_ms_per_token']:.1f} | {r['decode_ms_per_token']:.1f} | {r['decode_ratio']:.3f} |"
                for n, r in decode]
    return "\n".join(out)


def decode_speed(model, batch: dict[str, torch.Tensor], name: str, steps: int, repeats: int) -> dict[str, float]:
    """Median decode ms per token of ``name`` (``CACHE_OPTIONS``) against plain decoding."""
    def run(method: str | None) -> Callable[[], float]:
        def call() -> float:
            cache = {compat.cache_keyword(type(model).forward): DynamicCache()}
            with torch.no_grad():
                ctx = tokensieve.prune(model, method, **CACHE_OPTIONS.get(method, {"keep": 0.5})) if method \
                    else contextlib.nullcontext()
                with ctx:
                    out = model(**batch, **cache, use_cache=True, logits_to_keep=1)
                    token = out.logits[:, -1:].argmax(-1)
                    mask = batch["attention_mask"]
                    start = time.perf_counter()
                    for _ in range(steps):
                        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                        out = model(input_ids=token, attention_mask=mask, **cache, use_cache=True)
                        token = out.logits[:, -1:].argmax(-1)
            return 1000 * (time.perf_counter() - start) / steps
        return call

    ms = median_ms({"plain": run(None), "method": run(name)}, repeats, f"{name} decode")
    return {"plain_decode_ms_per_token": ms["plain"], "decode_ms_per_token": ms["method"],
            "decode_ratio": ms["method"] / ms["plain"]}


if __name__ == "__main__":
    main()
