"""``tokensieve recipes``: the published FitPrune recipes a user can name instead of a file."""

from __future__ import annotations

import argparse
import json

from ..recipe import published


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the built-in (published) FitPrune recipes",
                       description="Recipes usable by name wherever a recipe file is taken "
                                   "(eval --method fitprune --recipe NAME, flops --recipe NAME).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    recipes = published()
    if args.json:
        print(json.dumps({name: r.to_dict() for name, r in recipes.items()}, indent=2))
        return 0
    for name, r in recipes.items():
        print(f"{name:<28} {r.model}, {r.visual_tokens} visual tokens, {r.num_layers} layers, FLOPs {r.budget} "
              f"({r.flops_convention} convention), removes {sum(r.removed.values())} in layers "
              f"{min(r.removed)}-{max(r.removed)}")
    first = next(iter(recipes.values()))
    print(f"source: {first.calibration.removeprefix('published: ')}")
    return 0
