"""The per-sample report of a pass: lengths per layer, kept visual positions, FLOPs, KV bytes."""

from __future__ import annotations

import torch

from ..cache import LedgerCache
from ..flops import prefill_flops
from ..report import Report, SampleReport
from .state import EngineParts

UNPRUNED_NOTE = "no visual tokens: passed through unpruned"


class Reporting(EngineParts):
    """Part of :class:`~tokensieve.engine.core.Engine`."""

    def _new_report(self) -> Report:
        return Report(self.method.name, self.method.report_options(), self.positions)

    def _write_report(self, prefill: bool, cache: LedgerCache | None) -> None:
        ledger, report = self.ledger, self.report
        batch = ledger.real.shape[0]
        cache_counts = [self._real_counts(c).tolist() if c is not None else [0] * batch for c in ledger.caches]
        element = 2 * self.shape.kv_width * self._kv_element_size()
        kept = self._cache_kept(batch)
        heads = self._cache_heads(batch)
        stored = self._stored_bytes(cache, batch)
        if prefill:
            prompt_real = ledger.real[:, : ledger.prompt_length].sum(1).tolist()
            hidden = torch.stack(ledger.hidden_counts).tolist() if ledger.hidden_counts else []
            visual_counts = torch.stack(ledger.visual_counts).tolist() if ledger.visual_counts else []
            inside = {l: c.tolist() for l, c in ledger.inside_counts.items()}
            samples = []
            for b in range(batch):
                lengths = [counts[b] for counts in hidden]
                out_lengths = [inside[l][b] if l in inside else n for l, n in enumerate(lengths)]
                visual = [counts[b] for counts in visual_counts]
                caches = [c[b] for c in cache_counts]
                vis_in = len(ledger.visual_kept["input"][b])
                samples.append(
                    SampleReport(
                        hidden_lengths=lengths,
                        attention_out_lengths=out_lengths,
                        cache_lengths_prefill=caches,
                        cache_lengths_end=list(caches),
                        visual_tokens=vis_in,
                        visual_lengths=visual,
                        visual_kept={k: v[b] for k, v in ledger.visual_kept.items()},
                        flops=prefill_flops(self.shape, lengths, out_lengths),
                        flops_unpruned=prefill_flops(self.shape, [prompt_real[b]] * self.num_layers),
                        kv_bytes_prefill=sum(caches) * element,
                        kv_bytes_end=sum(caches) * element,
                        cache_kept_prefill=kept[b],
                        cache_kept_end=kept[b],
                        cache_heads_prefill=heads[b],
                        cache_heads_end=heads[b],
                        kv_bytes_stored_prefill=stored[b],
                        kv_bytes_stored_end=stored[b],
                        note=UNPRUNED_NOTE if self.method.visual and vis_in == 0 else "",
                    )
                )
            report.samples = samples
        else:
            report.decode_steps += 1
            for b, sample in enumerate(report.samples):
                sample.cache_lengths_end = [c[b] for c in cache_counts]
                sample.kv_bytes_end = sum(sample.cache_lengths_end) * element
                sample.cache_kept_end = kept[b]
                sample.cache_heads_end = heads[b]
                sample.kv_bytes_stored_end = stored[b]
        if self.aux is not None:
            for b, sample in enumerate(report.samples):
                sample.attended = [(ledger.real[b] & chosen[b]).nonzero().squeeze(1).tolist()
                                   for chosen in self.aux.attended if chosen is not None]

    def _cache_kept(self, batch: int) -> list[list[list[int]]]:
        """Per sample, per decoder layer: the original positions of the real entries its cache holds."""
        ledger = self.ledger
        out: list[list[list[int]]] = [[] for _ in range(batch)]
        for rows in ledger.caches:
            if rows is None:
                for b in range(batch):
                    out[b].append([])
                continue
            real = ledger.real.gather(1, rows.pos) & rows.valid
            for b in range(batch):
                out[b].append(rows.pos[b][real[b]].tolist())
        return out

    def _cache_heads(self, batch: int) -> list[list[list[list[int]]]]:
        """Per sample, per decoder layer, per KV head: the original positions of the real entries that
        head attends to, where the layer's method evicted per head (else an empty list)."""
        ledger = self.ledger
        out: list[list[list[list[int]]]] = [[] for _ in range(batch)]
        for rows, heads in zip(ledger.caches, ledger.heads):
            real = None if heads is None else heads & ledger.real.gather(1, rows.pos)[:, None]
            for b in range(batch):
                out[b].append([] if real is None else [rows.pos[b][h].tolist() for h in real[b]])
        return out

    @staticmethod
    def _stored_bytes(cache: LedgerCache | None, batch: int) -> list[int]:
        """Per sample, the bytes its rows of the cache's key and value tensors really occupy, every
        layer, padding entries of ragged batches and of the input included (measured, not modelled);
        for a paged cache, its share of the block pools (free blocks included)."""
        if cache is None:
            return [0] * batch
        if hasattr(cache, "stored_bytes"):  # a paged cache: its block pools are the storage
            return [cache.stored_bytes() // batch] * batch
        total = 0
        for layer in cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.numel():
                    total += t.numel() * t.element_size()
        return [total // batch] * batch

    def _kv_element_size(self) -> int:
        param = next(self.adapter.layers[0].parameters())
        return param.element_size()
