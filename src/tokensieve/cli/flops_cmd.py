"""``tokensieve flops``: analytic LLM prefill FLOPs of a method or a schedule on a model config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import methods
from ..flops import builtin_configs, load_shape, prefill_flops, schedule_from_removed
from ..recipe import Recipe
from .options import add_method_flags, method_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="analytic prefill FLOPs of a pruning method or schedule",
                       description="Analytic LLM prefill FLOPs (2 x MACs; 4nd^2 + 2n^2d + 3ndm per layer). "
                       f"Built-in configs: {', '.join(builtin_configs())}.")
    p.add_argument("--model", required=True, help="built-in config name, config.json, or model directory")
    p.add_argument("--schedule", type=Path, help='JSON {"removed": {layer: visual tokens removed}, "inside_layer": bool}')
    p.add_argument("--image-tokens", type=int, default=576, help="visual tokens in the prompt (default 576)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens in the prompt (default 64)")
    p.add_argument("--visual-only", action="store_true", help="count visual tokens only (FitPrune's convention)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_method_flags(p, default_method=None, method_help="method name (see `tokensieve methods`)")
    p.set_defaults(handler=run)


def _schedule_file(path: Path, layers: int, n_visual: int) -> tuple[list[int], list[int]]:
    try:
        data = json.loads(path.read_text())
        removed = {int(k): int(v) for k, v in data["removed"].items()}
        inside = bool(data.get("inside_layer", False))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f'{path} is not a schedule {{"removed": {{layer: count}}, "inside_layer": bool}}: {err}') from None
    return schedule_from_removed(layers, n_visual, removed, inside)


def compute(args: argparse.Namespace) -> dict[str, Any]:
    shape = load_shape(args.model)
    if args.image_tokens < 0 or args.text_tokens < 0:
        raise ValueError("--image-tokens and --text-tokens must be >= 0")
    if args.method is None and getattr(args, "recipe", None) is not None:
        args.recipe = Recipe.load(args.recipe)  # a file or a published name (`tokensieve recipes`)
        args.method = args.recipe.method  # whose recipe it is: FitPrune's, or a fitted scorer's
    if (args.method is None) == (args.schedule is None):
        raise ValueError("give exactly one of --method (or --recipe) or --schedule")
    options = method_options(args, args.method)
    if args.schedule is not None:
        vis_in, vis_out = _schedule_file(args.schedule, shape.layers, args.image_tokens)
    else:
        method = methods.get(args.method, **options)
        method.bind(shape.layers)
        vis_in, vis_out = method.visual_schedule(shape.layers, args.image_tokens)
    text = 0 if args.visual_only else args.text_tokens
    n_in = [v + text for v in vis_in]
    n_out = [v + text for v in vis_out]
    pruned = prefill_flops(shape, n_in, n_out)
    full = prefill_flops(shape, [args.image_tokens + text] * shape.layers)
    return {
        "model": args.model,
        "tflops": pruned / 1e12,
        "tflops_unpruned": full / 1e12,
        "ratio": pruned / full,
        "visual_tokens_per_layer": vis_in,
        "text_tokens": text,
        "visual_only": bool(args.visual_only),
    }


def run(args: argparse.Namespace) -> int:
    result = compute(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}: {result['tflops']:.4f} TFLOPs pruned / {result['tflops_unpruned']:.4f} unpruned "
              f"= ratio {result['ratio']:.3f}" + (" (visual tokens only)" if args.visual_only else ""))
    return 0
