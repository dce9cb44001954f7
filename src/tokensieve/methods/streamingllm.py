"""StreamingLLM: keep attention sinks and a window of recent tokens in every layer's KV cache.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453);
authors' code mit-han-lab/streaming-llm.

Cache stage, every layer including layer 0: after the prefill and after each decode step, each
sample's cache keeps its first ``sinks`` real tokens and its ``window`` most recent tokens, as the
release's ``StartRecentKVCache.__call__`` (``streaming_llm/kv_cache.py``) trims the cache to
``start_size + recent_size`` after every token in ``examples/eval_long_ppl.py``.

Positions (``positions``):
    * ``"shift"`` (the paper's Section 3.2 and the release for Llama,
      ``streaming_llm/pos_shift/modify_llama.py`` ``llama_pos_shift_attention_forward``): positions
      within the cache, not in the text. The release stores keys unrotated and rotates them at their
      cache index ``0..m-1`` at every step, the new token's query at ``m``; here the cached keys stay
      rotated and are re-rotated by the change of their index after each eviction (a rotary rotation
      by ``a`` then ``b`` is one by ``a + b``), which gives the same keys up to rounding.
    * ``"keep"``: every token keeps its original rotary position and decoded tokens get the positions
      they would have had without eviction (NVIDIA kvpress's ``StreamingLLMPress``): the result is what
      a full-cache model computes with the evicted tokens masked out.
    * ``"auto"`` (default): ``"shift"``, except on M-RoPE models (Qwen2-VL), whose positions encode
      the image grid: ``"keep"`` there.
Choice made here: with left-padded batches the cache index counts a sample's real entries only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import CacheView, Method


@dataclass
class StreamingLLM(Method):
    """Options: ``sinks`` initial tokens kept, ``window`` most recent tokens kept, ``positions``
    (``"auto"``, ``"shift"``: positions within the cache; ``"keep"``: original positions)."""

    sinks: int = 4
    window: int = 64
    positions: Literal["auto", "shift", "keep"] = "auto"

    name: ClassVar[str] = "streamingllm"
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    paper: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    visual: ClassVar[bool] = False

    def validate(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")

    def cache_positions(self) -> Literal["keep", "shift", "auto"]:
        return self.positions

    def evict(self, view: CacheView) -> torch.Tensor:
        # rank among real entries: the first `sinks` and the last `window` survive
        order = view.real.long().cumsum(1)
        total = order[:, -1:]
        return view.real & ((order <= self.sinks) | (order > total - self.window))
