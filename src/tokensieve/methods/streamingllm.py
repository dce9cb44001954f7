"""StreamingLLM: keep attention sinks and a window of recent tokens in every layer's KV cache.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453);
authors' code mit-han-lab/streaming-llm.

Cache stage, every layer including layer 0: after the prefill and after each decode step, each
sample's cache keeps its first ``sinks`` real tokens and its ``window`` most recent tokens. Tokens
keep their original rotary positions (the engine never renumbers inside the LLM), and decoded tokens
get the positions they would have had without eviction. Choice made here: positions are not shifted
into the cache as the paper's streaming variant does, so the result matches what a full-cache model
would compute with the same tokens masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CacheView, Method


@dataclass
class StreamingLLM(Method):
    """Options: ``sinks`` initial tokens kept, ``window`` most recent tokens kept."""

    sinks: int = 4
    window: int = 64

    name: ClassVar[str] = "streamingllm"
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    paper: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    visual: ClassVar[bool] = False

    def validate(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")

    def evict(self, view: CacheView) -> torch.Tensor:
        # rank among real entries: the first `sinks` and the last `window` survive
        order = view.real.long().cumsum(1)
        total = order[:, -1:]
        return view.real & ((order <= self.sinks) | (order > total - self.window))
