"""``none``: the engine runs (ledger, report, FLOPs) and removes nothing: the unpruned reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method


@dataclass
class Unpruned(Method):
    """No options. Outputs equal the plain model's exactly."""

    name: ClassVar[str] = "none"
    stages: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = "reference: nothing pruned"
    visual: ClassVar[bool] = False
