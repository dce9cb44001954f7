"""The methods, by name. ``tokensieve.methods.FastV(layer=2, keep=0.25)`` or ``get("fastv", ...)``."""

from __future__ import annotations

import difflib
from typing import Any

from .base import CacheView, Grid, Method, Point, Selection, View
from .a2sf import A2SF
from .aim import AIM
from .cache_base import CacheScorer
from .dart import DART
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .fitprune import FitPrune, FitPruneSearch
from .h2o import H2O
from .lazyllm import LazyLLM
from .none import Unpruned
from .pagedeviction import PagedEviction
from .pdrop import PDrop
from .pool import Pool
from .random_drop import RandomDrop
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tome import ToMe
from .transprune import TransPrune
from .vflowopt import VFlowOpt
from .visionzip import VisionZip

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Unpruned, FastV, FitPrune, RandomDrop, Pool, StreamingLLM, H2O, SnapKV, A2SF, PagedEviction, LazyLLM, DivPrune, FasterVLM, DART, PDrop, VisionZip, ToMe, TransPrune, AIM, VFlowOpt)}


def get(name: str | Method, **options: Any) -> Method:
    """Build a method from its name and options, or return a Method instance unchanged.

    Raises:
        ValueError: unknown name (the closest names are suggested).
        TypeError: an option the method does not take (its options are listed).
    """
    if isinstance(name, Method):
        if options:
            raise TypeError("options go into the method's constructor when passing a Method instance")
        return name
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), REGISTRY, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} Available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    valid = cls.options()
    bad = [k for k in options if k not in valid]
    if bad:
        raise TypeError(f"method {name!r} takes no option {', '.join(map(repr, bad))}; its options are: {', '.join(valid)}")
    return cls(**options)


__all__ = ["REGISTRY", "get", "Method", "Point", "View", "Selection", "CacheView", "Grid",
           "Unpruned", "FastV", "FitPrune", "FitPruneSearch", "DivPrune", "FasterVLM", "DART", "PDrop", "VisionZip", "ToMe", "TransPrune", "AIM", "VFlowOpt", "RandomDrop", "Pool", "StreamingLLM",
           "CacheScorer", "H2O", "SnapKV", "A2SF", "PagedEviction", "LazyLLM"]
