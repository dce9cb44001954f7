"""``prune()``: the context manager users call, and the handle it yields."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from .. import methods as method_registry
from ..methods.base import Method
from ..report import Report
from ..tower import TowerResult
from .core import Engine


class Run:
    """Handle returned by :func:`prune`: ``run.report`` is the latest call's report."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def report(self) -> Report:
        return self._engine.report

    @property
    def reports(self) -> list[Report]:
        """Reports of every prefill run inside the context, oldest first."""
        return list(self._engine.history)

    @property
    def method(self) -> Method:
        return self._engine.method

    @property
    def tower(self) -> TowerResult | None:
        """The latest prefill's merging inside the vision tower (methods that merge there, ToMe), else None."""
        return self._engine.tower.result if self._engine.tower is not None else None


@contextlib.contextmanager
def prune(model: nn.Module, method: str | Method, **options: Any) -> Iterator[Run]:
    """Prune ``model``'s tokens with ``method`` inside the ``with`` block.

    Example::

        with tokensieve.prune(model, "fastv", layer=2, keep=0.25) as run:
            out = model.generate(**inputs)
        run.report.to_dict()

    Args:
        model: a supported ``transformers`` model instance (see ``tokensieve.adapters``).
        method: a method name (``tokensieve methods`` lists them) or a :class:`~tokensieve.methods.Method`.
        **options: the method's options when ``method`` is a name.

    Raises:
        ValueError / TypeError: unknown method or option, options out of range, unsupported model;
            raised before the model is touched.
    """
    engine = Engine(model, method_registry.get(method, **options))
    try:
        engine.install()  # a failure part-way leaves nothing installed: remove() undoes what was done
        yield Run(engine)
    finally:
        engine.remove()
