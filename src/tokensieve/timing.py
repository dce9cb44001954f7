"""Wall-clock timing of a model's forward calls: prefill (time to first token) and decode steps."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class ForwardTimer:
    """Times every forward of ``model`` while installed; the first call(s) after :meth:`start` are the prefill.

    Install it inside a ``prune()`` context so its hooks wrap the engine's (the pre-hook is prepended,
    the post-hook appended): the engine's bookkeeping is then part of the measured time. A model on a
    CUDA device is synchronised at both ends of each call (queued kernels are then counted); on the
    CPU nothing is synchronised, whether or not the machine has a GPU.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        weight = next(model.parameters(), None)
        self._cuda = weight.device if weight is not None and weight.device.type == "cuda" else None
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self._t0 = 0.0
        self._pending = 1
        self._prefill = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> "ForwardTimer":
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, prepend=True),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def start(self, prefill_calls: int = 1) -> None:
        """Mark the start of a new generation: its first ``prefill_calls`` forwards, summed, are its
        prefill (two where the context and the question are fed apart: see :mod:`tokensieve.protocols`)."""
        self._pending = prefill_calls
        self._prefill = 0.0

    def _sync(self) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._sync()
        ms = 1000 * (time.perf_counter() - self._t0)
        if self._pending > 0:
            self._prefill += ms
            self._pending -= 1
            if self._pending == 0:
                self.prefill_ms.append(self._prefill)
        else:
            self.decode_ms.append(ms)
