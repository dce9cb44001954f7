"""The ``tokensieve`` command line: ``tokensieve {flops,methods,eval,train-tiny} ...``."""

from __future__ import annotations

import argparse
import sys

from . import bench_cmd, calibrate_cmd, compare_cmd, eval_cmd, flops_cmd, methods_cmd


class UserError(Exception):
    """A mistake in the command line or its inputs: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(prog="tokensieve", description="Training-free token pruning for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (flops_cmd, methods_cmd, eval_cmd, compare_cmd, calibrate_cmd, bench_cmd):
        module.add_parser(sub)
    from ..tiny import train

    train.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or args.func
        result = handler(args)
    except (ValueError, TypeError, FileNotFoundError, UserError) as err:
        print(f"tokensieve {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
