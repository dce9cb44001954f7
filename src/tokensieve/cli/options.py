"""Method options as command-line flags, shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import Any

FLAGS: dict[str, type] = {
    "layer": int, "keep": float, "variant": str, "seed": int, "stride": int, "positions": str,
    "sinks": int, "window": int, "recipe": str, "score": str, "flops": float,
    "ratio": float, "dominant": int, "contextual": int, "image_pivots": int, "text_pivots": int,
}


def add_method_flags(parser: argparse.ArgumentParser, default_method: str | None = "none") -> None:
    parser.add_argument("--method", default=default_method, help="method name (`tokensieve methods` lists them)")
    group = parser.add_argument_group("method options (only those the method takes)")
    for name, kind in FLAGS.items():
        group.add_argument(f"--{name}", type=kind, default=None)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags that were given."""
    return {name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None}
