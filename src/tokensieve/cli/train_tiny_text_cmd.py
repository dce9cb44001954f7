"""``tokensieve train-tiny-text``: train the shipped tiny long-context text model (``tokensieve.tiny_text.train``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    # imported here: the training module imports the CLI package for its exit status
    from ..tiny_text import train

    train.add_parser(sub)
