"""Method options as command-line flags, shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
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


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, for every subcommand that loads a model."""
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default: float32 on the CPU, bfloat16 on a GPU)")


def check_output_file(path: Path, flag: str) -> None:
    """Raise ValueError, before any work, unless ``path`` can be written as a file (its folder may be
    created): not an existing directory, and no regular file where a parent folder must be."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    _check_parents(path, flag)


def check_output_dir(path: Path, flag: str) -> None:
    """Raise ValueError, before any work, unless ``path`` is or can become a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            return
