"""What a pruned run reports, per sample: lengths per layer, kept visual positions, FLOPs, KV bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SampleReport:
    """One sample of one ``generate()`` / forward call.

    Attributes:
        hidden_lengths: real tokens entering each decoder layer during prefill.
        attention_out_lengths: real tokens leaving each layer's attention (smaller than
            ``hidden_lengths`` only where a method prunes inside that layer).
        cache_lengths_prefill: real entries in each layer's KV cache after prefill.
        cache_lengths_end: the same at the end of the call (after decoding).
        visual_tokens: visual tokens in the input.
        visual_lengths: visual tokens entering each decoder layer during prefill.
        visual_kept: stage name -> original positions of the visual tokens alive after that stage
            (``"input"`` is every visual token).
        flops, flops_unpruned: analytic LLM prefill FLOPs with and without pruning (all tokens).
        kv_bytes_prefill, kv_bytes_end: KV-cache bytes of this sample's real entries (analytic).
        cache_kept_prefill, cache_kept_end: per decoder layer, the original positions of the real
            entries its KV cache holds after prefill / at the end of the call.
        cache_heads_prefill, cache_heads_end: per decoder layer, per KV head, the original positions
            of the real entries that head attends to, for layers whose method evicted per head (the
            cache holds their union, ``cache_kept_*``); empty for the other layers.
        kv_bytes_stored_prefill, kv_bytes_stored_end: the bytes the cache's key and value tensors
            really hold for this sample's rows (measured: the tensors' storage over the batch, padding
            entries included).
        note: why a sample was left as it was (a text-only sample under a visual-token method), or "".
        attended: per decoder layer, the original positions of the real tokens its attention saw in
            the latest pass, for methods that choose them again at every pass (LazyLLM), else empty.
    """

    hidden_lengths: list[int]
    attention_out_lengths: list[int]
    cache_lengths_prefill: list[int]
    cache_lengths_end: list[int]
    visual_tokens: int
    visual_lengths: list[int]
    visual_kept: dict[str, list[int]]
    flops: int
    flops_unpruned: int
    kv_bytes_prefill: int
    kv_bytes_end: int
    cache_kept_prefill: list[list[int]] = field(default_factory=list)
    cache_kept_end: list[list[int]] = field(default_factory=list)
    cache_heads_prefill: list[list[list[int]]] = field(default_factory=list)
    cache_heads_end: list[list[list[int]]] = field(default_factory=list)
    kv_bytes_stored_prefill: int = 0
    kv_bytes_stored_end: int = 0
    note: str = ""
    attended: list[list[int]] = field(default_factory=list)


@dataclass
class Report:
    """The report of the latest call inside a ``prune()`` context (``run.report``)."""

    method: str
    options: dict[str, Any]
    positions: str
    samples: list[SampleReport] = field(default_factory=list)
    decode_steps: int = 0

    @property
    def flops_ratio(self) -> float:
        """Pruned over unpruned prefill FLOPs, summed over the samples."""
        return sum(s.flops for s in self.samples) / max(1, sum(s.flops_unpruned for s in self.samples))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "method": self.method,
            "options": dict(self.options),
            "positions": self.positions,
            "decode_steps": self.decode_steps,
            "flops_ratio": self.flops_ratio,
            "samples": [asdict(s) for s in self.samples],
        }
