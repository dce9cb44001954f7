"""StreamingLLM: keep attention sinks and a window of recent tokens in every layer's KV cache.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453);
authors' code mit-han-lab/streaming-llm.

Cache stage, every layer including layer 0: after the prefill and after each decode step, each
sample's cache keeps its first ``sinks`` real tokens and its ``window`` most recent tokens, as the
release's ``StartRecentKVCache.__call__`` (``streaming_llm/kv_cache.py``) trims the cache to
``start_size + recent_size`` after every token in ``examples/eval_long_ppl.py``.

Budget: ``window`` recent tokens (default 64 when no budget is given), or a budget in tokensieve's
vocabulary: ``budget`` entries per layer (``window = budget - sinks``), or ``keep``, a fraction of the
prompt's real entries (``window = max(1, round(keep * n) - sinks)``, fixed at prefill; each decode step
then keeps the cache at the size the prefill left it, as kvpress's ``StreamingLLMPress`` keeps
``n_sink`` tokens and the most recent ones up to ``(1 - compression_ratio) * n``). ``keep=1`` evicts
nothing.

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

from .base import CacheView, Method, check_fraction
from .cache_base import keep_budget

DEFAULT_WINDOW = 64
"""Recent tokens kept when no budget is given."""


@dataclass
class StreamingLLM(Method):
    """Options: ``sinks`` initial tokens kept; the recent tokens kept: ``window`` (default 64), or
    ``budget`` entries in all, or ``keep`` (fraction of the prompt's entries); ``positions``
    (``"auto"``, ``"shift"``: positions within the cache; ``"keep"``: original positions)."""

    sinks: int = 4
    window: int | None = None
    keep: float | None = None
    budget: int | None = None
    positions: Literal["auto", "shift", "keep"] = "auto"

    name: ClassVar[str] = "streamingllm"
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    paper: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    visual: ClassVar[bool] = False

    def validate(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        given = [n for n in ("window", "keep", "budget") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of window, keep and budget, not {' and '.join(given)}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.keep is not None:
            check_fraction("keep", self.keep)
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= self.sinks):
            raise ValueError(f"budget must be an integer above sinks ({self.sinks}), leaving room for a window; "
                             f"got {self.budget!r}")

    def cache_positions(self) -> Literal["keep", "shift", "auto"]:
        return self.positions

    def recent(self, view: CacheView) -> torch.Tensor:
        """``(B, 1)`` long: how many of each sample's most recent real entries stay."""
        real = view.real
        if self.keep is None:
            window = self.budget - self.sinks if self.budget is not None else self.window or DEFAULT_WINDOW
            return torch.full((real.shape[0], 1), window, dtype=torch.long, device=real.device)
        return (keep_budget(view, self.keep)[:, None] - self.sinks).clamp(min=1)

    def evict(self, view: CacheView) -> torch.Tensor | None:
        if self.keep == 1:  # kvpress's compression_ratio 0: nothing leaves
            return None
        # rank among real entries: the first `sinks` and the last `window` survive
        order = view.real.long().cumsum(1)
        total = order[:, -1:]
        return view.real & ((order <= self.sinks) | (order > total - self.recent(view)))
