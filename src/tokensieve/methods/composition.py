"""Several methods on one ledger: one before the LLM, one inside it, one in the KV cache.

``prune(model, ["divprune", "fitprune", "a2sf"], divprune={...}, fitprune={...}, a2sf={...})`` (or
``"divprune+fitprune+a2sf"``) runs the members in the order of their stages: the encoder-stage member
chooses the visual tokens entering the LLM, the prefill member prunes what reaches it inside the LLM,
the cache member evicts from the KV cache. The engine sees one method whose points, needs and cache
rule are the members' together; each point is answered by the member it belongs to.

Rules (tokensieve's, since no paper composes these methods):

* **One member per stage.** Stage sets must be disjoint (encoder, prefill, cache; a method acting in
  two, such as AIM, takes both); two members at the same stage are refused. LazyLLM, which re-chooses
  the tokens at every pass with its own Aux Cache, composes with nothing.
* **Budgets are relative to what reaches a member.** A later member's ``keep`` is a fraction of the
  visual tokens alive at its first point, and its per-input bookkeeping (PDrop's and TransPrune's
  ``N``, a FitPrune recipe's visual tokens) reads that count, not the input's. A FitPrune recipe
  fitted for the full image must therefore be used with ``fractions=True`` after an encoder member.
* **One FLOPs budget, split.** ``flops=F`` on the composition gives each of its ``k`` members that
  solve a FLOPs budget at run time (a ``flops`` option, FitPrune excepted: its budget is fitted
  offline into a recipe) and were given neither ``flops`` nor ``keep`` the budget ``F ** (1 / k)``.
  Each solves its budget against the FLOPs of what reaches it, so the products multiply to ``F`` (up
  to the rounding of token counts).
* **Positions.** The members that renumber positions at their own stages must agree on ``positions``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from .base import CacheView, Method, Point, Selection, View

STAGE_ORDER = ("encoder", "prefill", "cache")


class Composition(Method):
    """Members in stage order; built by :func:`tokensieve.methods.get` from a list or an ``"a+b"`` name."""

    name = "composition"
    stages: tuple[str, ...] = ()
    paper = "tokensieve: methods composed across stages"

    def __init__(self, members: list[Method], flops: float | None = None) -> None:
        if len(members) < 2:
            raise ValueError("a composition needs at least two methods")
        self.members = sorted(members, key=lambda m: min(STAGE_ORDER.index(s) for s in _stages(m)))
        self.flops = flops
        self.name = "+".join(m.name for m in self.members)
        for m in self.members:
            if "aux cache" in m.needs:
                raise ValueError(f"{m.name} chooses its tokens again at every pass and composes with no other method")
        seen: dict[str, str] = {}
        for m in self.members:
            for stage in _stages(m):
                if stage in seen:
                    raise ValueError(f"{seen[stage]} and {m.name} both act at the {stage} stage; "
                                     "a composition takes one method per stage (encoder, prefill, cache)")
                seen[stage] = m.name
        self.stages = tuple(s for s in STAGE_ORDER if s in seen)
        self.needs = tuple(dict.fromkeys(n for m in self.members for n in m.needs))
        self.visual = any(m.visual for m in self.members)
        renumbering = [m for m in self.members if set(m.renumber_at) & set(_stages(m))]
        modes = {m.positions_mode() for m in renumbering}
        if len(modes) > 1:
            said = ", ".join(f"{m.name} positions={m.positions_mode()!r}" for m in renumbering)
            raise ValueError(f"the members renumber positions differently ({said}); give them the same positions")
        self._mode = modes.pop() if modes else "keep"
        self.renumber_at = tuple(dict.fromkeys(s for m in renumbering for s in m.renumber_at if s in _stages(m)))
        self._owner: dict[Point, Method] = {}
        self._first: dict[int, Point] = {}
        self._alive: dict[int, list[int]] = {}

    def bind(self, num_layers: int) -> None:
        self._owner = {}
        for m in self.members:
            m.bind(num_layers)
            for point in m.points():
                if point in self._owner:
                    raise ValueError(f"{self._owner[point].name} and {m.name} both select at {point}")
                self._owner[point] = m
            points = m.points()
            if points:
                self._first[id(m)] = min(points, key=lambda p: (STAGE_ORDER.index(p.stage), p.before))

    def check_input(self, visual_tokens: list[int]) -> None:
        """The first visual member checks the input; the later ones check what reaches them, at their
        first point."""
        first = self._first_visual()
        if first is not None:
            first.check_input(visual_tokens)

    def points(self) -> list[Point]:
        return sorted(self._owner, key=lambda p: (p.before, STAGE_ORDER.index(p.stage)))

    def select(self, view: View) -> Selection:
        member = self._owner[view.point]
        key = id(member)
        if member is not self._first_visual():
            if view.point == self._first.get(key):
                self._alive[key] = view.visual.sum(1).tolist()
                member.check_input(self._alive[key])
            view = dataclasses.replace(view, visual_input=self._alive[key])
        return member.select(view)

    def _first_visual(self) -> Method | None:
        """The first member that selects visual tokens: it sees the input as it is."""
        return next((m for m in self.members if m.visual and m.points()), None)

    def evict(self, view: CacheView) -> torch.Tensor | None:
        member = self._member("cache")
        return member.evict(view) if member is not None else None

    def transition_layers(self) -> list[int]:
        return [l for m in self.members if "transitions" in m.needs for l in m.transition_layers()]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """Each member's schedule on what the one before it left (an encoder member's count holds at
        every layer)."""
        ins, outs = [n_visual] * num_layers, [n_visual] * num_layers
        for m in self.members:
            reaching = ins[0] if "encoder" not in _stages(m) else n_visual
            m_in, m_out = m.visual_schedule(num_layers, reaching)
            ins = [min(a, b) for a, b in zip(ins, m_in)]
            outs = [min(a, b) for a, b in zip(outs, m_out)]
        return ins, outs

    def positions_mode(self) -> Literal["keep", "renumber", "auto"]:
        return self._mode

    def cache_positions(self) -> Literal["keep", "shift", "auto"]:
        member = self._member("cache")
        return member.cache_positions() if member is not None else "keep"

    def report_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {m.name: m.report_options() for m in self.members}
        if self.flops is not None:
            out["flops"] = self.flops
        return out

    # what the engine reads from the member that has it: the paged layout, the vision-tower merging
    @property
    def block_size(self) -> int:
        return self._member("cache").block_size

    def check_tower(self, *args: Any) -> None:
        return self._needing("tower").check_tower(*args)

    def tower_plan(self, *args: Any) -> Any:
        return self._needing("tower").tower_plan(*args)

    def match(self, *args: Any) -> Any:
        return self._needing("tower").match(*args)

    def _member(self, stage: str) -> Method | None:
        return next((m for m in self.members if stage in _stages(m)), None)

    def _needing(self, need: str) -> Method:
        return next(m for m in self.members if need in m.needs)


def _stages(method: Method) -> tuple[str, ...]:
    """The stages a method acts at, among encoder / prefill / cache (decode-time work is the cache's)."""
    stages = tuple(s for s in method.stages if s in STAGE_ORDER)
    if not stages:
        raise ValueError(f"{method.name} acts at no stage a composition orders (encoder, prefill, cache)")
    return stages


BUDGET_OPTIONS = ("flops", "keep", "ratio")
"""Options that set a member's own budget: a member given one takes no share of the composition's."""


def takes_flops_share(name: str, cls: type[Method], options: dict[str, Any]) -> bool:
    """Whether member ``name`` (class ``cls``, given ``options``) takes a share of a composition's FLOPs."""
    return "flops" in cls.options() and name != "fitprune" and not set(BUDGET_OPTIONS) & set(options)


def split_flops(flops: float, takers: int) -> float:
    """Each of ``takers`` members' share of a FLOPs budget ``flops``: ``flops ** (1 / takers)``."""
    return flops ** (1 / takers)
