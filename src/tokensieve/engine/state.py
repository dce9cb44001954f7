"""What the engine's parts share: the state of one forward call (:class:`Pass`) and the engine's attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters import Adapter
from ..cache import LedgerCache
from ..flops import Shape
from ..ledger import Ledger, Rows
from ..methods.base import Method, Point
from ..report import Report
from ..tower import TowerStage
from ..vision import VisionTap

if TYPE_CHECKING:
    from .revival import AuxCache


@dataclass
class Pass:
    """State of one forward call of the top-level model."""

    prefill: bool
    offset: int
    new_tokens: int
    cache: LedgerCache | None
    saved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Rows]] = field(default_factory=dict)
    projected: dict[tuple[int, str], tuple[Rows, torch.Tensor]] = field(default_factory=dict)
    memo: dict[tuple, Any] = field(default_factory=dict)
    version: int = 0


class EngineParts:
    """The attributes the engine's parts share: set when the engine is made (checks, signals, taps)
    and at each pass (``ledger``, ``state``); every part of :class:`~tokensieve.engine.core.Engine`
    derives from this, so each module states what it reads."""

    model: nn.Module
    adapter: Adapter
    method: Method
    num_layers: int
    shape: Shape
    points: dict[int, list[Point]]
    attention_layers: set[int]
    last_reader: dict[int, int]
    renumber: bool
    cache_shift: bool
    positions: str
    vision_tap: VisionTap | None
    tower: TowerStage | None
    transition_layers: set[int]
    ledger: Ledger | None
    aux: "AuxCache | None"
    state: Pass | None
    selecting: bool
    grids: list[list[tuple[torch.Tensor, int, int]]]
    report: Report
    history: list[Report]
