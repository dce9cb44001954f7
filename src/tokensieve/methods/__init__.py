"""The methods, by name. ``tokensieve.methods.FastV(layer=2, keep=0.25)`` or ``get("fastv", ...)``."""

from __future__ import annotations

import difflib
from typing import Any

from .base import CacheView, Grid, Method, Point, Selection, View, check_budget
from .a2sf import A2SF
from .aim import AIM
from .atp import ATP
from .cache_base import CacheScorer
from .composition import Composition, split_flops, takes_flops_share
from .dart import DART
from .evs import EVS
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .fitprune import FitPrune, FitPruneSearch
from .h2o import H2O
from .lazyllm import LazyLLM
from .lvpruning import LVPruning
from .metok import METok
from .none import Unpruned
from .pagedeviction import PagedEviction
from .pdrop import PDrop
from .pool import Pool
from .random_drop import RandomDrop
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tome import ToMe
from .transprune import TransPrune
from .uniform_frames import UniformFrames
from .vflowopt import VFlowOpt
from .visionzip import VisionZip

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Unpruned, FastV, FitPrune, RandomDrop, Pool, StreamingLLM, H2O, SnapKV, A2SF, PagedEviction, LazyLLM, DivPrune, FasterVLM, DART, PDrop, VisionZip, ToMe, TransPrune, AIM, VFlowOpt, LVPruning, ATP, EVS, UniformFrames, METok)}


def get(name: str | Method | list[str | Method], **options: Any) -> Method:
    """Build a method from its name and options, or return a Method instance unchanged.

    A list of methods, or names joined by ``+`` (``"divprune+fastv"``), is a
    :class:`~tokensieve.methods.composition.Composition`: ``options`` then holds each member's options
    under its name (``divprune={"keep": 0.5}``) and optionally ``flops``, a budget split among the
    members that take it (see the composition module).

    Raises:
        ValueError: unknown name (the closest names are suggested).
        TypeError: an option the method does not take (its options are listed).
    """
    if isinstance(name, (list, tuple)) or (isinstance(name, str) and "+" in name):
        return compose(name.split("+") if isinstance(name, str) else list(name), **options)
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


def compose(members: list[str | Method], flops: float | None = None, **options: Any) -> Composition:
    """A :class:`Composition` of ``members`` (names or Method instances); ``options[name]`` is a
    named member's options, ``flops`` the composition's budget."""
    names = [m for m in members if isinstance(m, str)]
    if len(set(names)) != len(names):
        raise ValueError(f"a method appears twice in {'+'.join(names)}")
    stray = [k for k in options if k not in names]
    if stray:
        raise TypeError(f"options of a composition go under its members' names ({', '.join(names) or 'none named'}); "
                        f"got {', '.join(map(repr, stray))}")
    for k in names:
        if not isinstance(options.get(k, {}), dict):
            raise TypeError(f"{k}'s options in a composition are a dict, got {options[k]!r}")
    given = {k: dict(options.get(k, {})) for k in names}
    if flops is not None:
        check_budget(None, flops)
        takers = [k for k in names if k in REGISTRY and takes_flops_share(k, REGISTRY[k], given[k])]
        if not takers:
            raise ValueError("flops on a composition needs a member that solves a FLOPs budget and was given "
                             "no budget of its own (flops, keep or ratio)")
        for k in takers:
            given[k]["flops"] = split_flops(flops, len(takers))
    return Composition([get(m, **given[m]) if isinstance(m, str) else m for m in members], flops=flops)


__all__ = ["REGISTRY", "get", "compose", "Composition", "Method", "Point", "View", "Selection", "CacheView", "Grid",
           "Unpruned", "FastV", "FitPrune", "FitPruneSearch", "DivPrune", "FasterVLM", "DART", "PDrop", "VisionZip", "ToMe", "TransPrune", "AIM", "VFlowOpt", "RandomDrop", "Pool", "StreamingLLM",
           "CacheScorer", "H2O", "SnapKV", "A2SF", "PagedEviction", "LazyLLM", "EVS", "UniformFrames", "METok"]
