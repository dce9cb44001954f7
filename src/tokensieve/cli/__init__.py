"""The ``tokensieve`` command line: ``tokensieve {flops,methods,eval,compare,calibrate,bench,export-lmms-tasks,train-tiny,
train-tiny-text,train-lvpruning,train-atp,train-tiny-ssm,eval-ssm,
train-tiny-detector,train-bavit,eval-detect,train-tiny-videomae,eval-video-vit,train-tiny-video} ...``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

from .. import __version__
from . import bench_cmd, calibrate_cmd, compare_cmd, eval_cmd, eval_detect_cmd, eval_ssm_cmd, eval_video_vit_cmd, export_lmms_cmd, flops_cmd, methods_cmd, recipes_cmd, train_atp_cmd, train_lvpruning_cmd, train_tiny_ssm_cmd, train_tiny_text_cmd, train_tiny_video_cmd, train_tiny_videomae_cmd

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


class UserError(Exception):
    """A mistake in the command line or its inputs: printed without a traceback, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a hint when a flag was written with underscores (flags use dashes)."""

    def error(self, message: str) -> NoReturn:
        underscored = re.findall(r"--\w*_[\w_]*", message) if "unrecognized arguments" in message else []
        if underscored:
            message += f" (flags are spelled with dashes: {', '.join(u.replace('_', '-') for u in underscored)})"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    parser = Parser(prog="tokensieve", description="Training-free token pruning for transformers models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (flops_cmd, methods_cmd, recipes_cmd, eval_cmd, compare_cmd, calibrate_cmd, bench_cmd, export_lmms_cmd):
        module.add_parser(sub)
    from ..tiny import train

    train.add_parser(sub)
    train_tiny_text_cmd.add_parser(sub)
    train_lvpruning_cmd.add_parser(sub)
    train_atp_cmd.add_parser(sub)
    train_tiny_ssm_cmd.add_parser(sub)
    eval_ssm_cmd.add_parser(sub)
    train_tiny_videomae_cmd.add_parser(sub)
    eval_video_vit_cmd.add_parser(sub)
    train_tiny_video_cmd.add_parser(sub)
    from ..detect import train_bavit, train_detector

    train_detector.add_parser(sub)
    train_bavit.add_parser(sub)
    eval_detect_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status. Mistakes print one line (status 2), Ctrl-C prints one
    line (status 130), and a reader that closes the pipe early (``| head``) ends output quietly."""
    prog = "tokensieve"
    try:
        args = build_parser().parse_args(argv)
        prog = f"tokensieve {args.command}"
        status = _run(args, prog)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # the reader has gone: send the rest of the output nowhere so that exit's flush cannot fail
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return status


def _run(args: argparse.Namespace, prog: str) -> int:
    try:
        handler = getattr(args, "handler", None) or args.func
        return int(handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, UserError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
