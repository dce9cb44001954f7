"""``tokensieve train-tiny-video``: train the tiny video VLM (``tokensieve.tiny_video.train``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..tiny_video import train

    train.add_parser(sub)
