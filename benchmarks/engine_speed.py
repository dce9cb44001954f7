"""Engine overhead and FastV speedup on a LLaVA-1.5-7B-shaped model with random weights.

Measures prefill time (one forward with a cache, logits for the last token only, as in generate()):
  * plain model;
  * shimmed with nothing pruned (``random`` keep=1.0: every shim, the ledger and the hooks run);
  * FastV K=2, keep 25%;
and reports the overhead (shimmed / plain - 1) and the achieved FastV speedup over the speedup the
analytic FLOPs predict (all LLM tokens counted), for the whole forward and for the language model
alone (the FLOPs model covers the LLM only; the vision tower, projector and head are fixed costs).

    python benchmarks/engine_speed.py --layers 4 --device cpu --dtype float32 --repeats 5
    python benchmarks/engine_speed.py --layers 32 --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokensieve
from tokensieve.flops import Shape, prefill_flops
from tokensieve.timing import ForwardTimer

IMAGE_TOKEN = 32000


def build(layers: int, vision_layers: int, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-1 if vision_layers == 1 else -2, vision_feature_select_strategy="default")
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    model.config._attn_implementation = "sdpa"
    model.config.text_config._attn_implementation = "sdpa"
    model.config.vision_config._attn_implementation = "sdpa"
    return model.eval()


def inputs(batch: int, text: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    before = torch.randint(3, 30000, (batch, 5), generator=gen)
    after = torch.randint(3, 30000, (batch, text - 5), generator=gen)
    ids = torch.cat([before, torch.full((batch, 576), IMAGE_TOKEN), after], 1)
    pixels = torch.randn(batch, 3, 336, 336, generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def timed(settings: dict, repeats: int, device: str, llm: ForwardTimer) -> dict[str, tuple[float, float]]:
    """Median seconds of each setting's call and of the language model's forward inside it.

    The settings run in turn inside every repeat (after two warm-up turns), so that drift in the
    machine's load affects them alike.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    for i in range(repeats + 2):
        for name, fn in settings.items():
            if device == "cuda":
                torch.cuda.synchronize()
            llm.start()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append((time.perf_counter() - start, llm.prefill_ms[-1] / 1000))
    return {name: (statistics.median(t for t, _ in v), statistics.median(l for _, l in v)) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.layers, args.vision_layers, dtype, args.device)
    batch = inputs(args.batch, args.text_tokens, args.device, dtype)

    def prefill():
        with torch.no_grad():
            model(**batch, use_cache=True, logits_to_keep=1)

    def under(method, **options):
        def run():
            with tokensieve.prune(model, method, **options):
                prefill()
        return run

    settings = {"plain": prefill, "shim": under("random", keep=1.0), "fastv": under("fastv", layer=2, keep=0.25)}
    with ForwardTimer(model.model.language_model) as llm:
        medians = timed(settings, args.repeats, args.device, llm)
    (t_plain, l_plain), (t_shim, l_shim), (t_fastv, l_fastv) = medians["plain"], medians["shim"], medians["fastv"]
    shape = Shape.from_config(model.config.text_config)
    n = 576 + args.text_tokens
    kept = n - 576 + 144
    predicted = prefill_flops(shape, [n] * args.layers) / prefill_flops(shape, [n] * 2 + [kept] * (args.layers - 2))
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.threads} threads)",
        "dtype": args.dtype, "layers": args.layers, "batch": args.batch, "tokens": n,
        "repeats": args.repeats,
        "plain_ms": 1000 * t_plain, "shimmed_keep_all_ms": 1000 * t_shim, "fastv_keep25_ms": 1000 * t_fastv,
        "llm_plain_ms": 1000 * l_plain, "llm_shimmed_keep_all_ms": 1000 * l_shim, "llm_fastv_keep25_ms": 1000 * l_fastv,
        "overhead": t_shim / t_plain - 1,
        "speedup_predicted": predicted,
        "speedup_achieved": t_plain / t_fastv, "speedup_ratio": (t_plain / t_fastv) / predicted,
        "llm_speedup_achieved": l_plain / l_fastv, "llm_speedup_ratio": (l_plain / l_fastv) / predicted,
        "versions": {"torch": torch.__version__, "tokensieve": tokensieve.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
