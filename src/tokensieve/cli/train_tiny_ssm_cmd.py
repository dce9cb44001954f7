"""``tokensieve train-tiny-ssm``: train the tiny Vim-style SSM classifier (``tokensieve.ssm.train``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..ssm import train

    train.add_parser(sub)
