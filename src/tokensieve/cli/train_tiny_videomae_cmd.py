"""``tokensieve train-tiny-videomae``: train the tiny VideoMAE clip classifier (``tokensieve.video.train``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..video import train

    train.add_parser(sub)
